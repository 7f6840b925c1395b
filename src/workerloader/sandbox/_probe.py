"""A probe of a worker's first call: a throwaway worker, forked from the zygote, that a second
child takes through a typical load and first call, so that the zygote can learn what such a
call does to a process forked from it (``_prefault``: the pages it copies; ``_pack``: the code
objects it writes to).

The probe runs only the code below, never a tenant's, and is killed once it has reported. The
session is driven from a second child, not from the zygote, so that the zygote's own memory
stays as its workers will find it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from . import _syscalls as sc

__all__ = ["probe_first_call", "report"]

_TIMEOUT_S = 10.0  # a probe that has not reported by then is given up

_CODE: dict[str, Any] = {
    "main_module": "main.py",
    "modules": {
        "main.py": (
            "from workers import WorkerEntrypoint\n"
            "from workerloader.sandbox._probe import report\n\n"
            "class Default(WorkerEntrypoint):\n"
            "    async def add(self, a, b):\n"
            "        return a + b\n\n"
            "    async def report(self):\n"
            "        return report()\n"
        )
    },
    "limits": {},
}
"""What the probe loads: a typical small worker, plus a method that reports (called second, so
that the first call's whole path, through its answer, is behind it), with the ``env`` of a
service's workers (``sdk_shaped_env``)."""

_after: Callable[[], bytes] | None = None  # set in the zygote before the probe forks


def report() -> bytes:
    """In the probe, for its second call: what ``after`` (of ``probe_first_call``) found."""
    assert _after is not None
    return _after()


def probe_first_call(
    serve: Callable[[socket.socket, Callable[[], None]], int],
    before: Callable[[], None],
    after: Callable[[], bytes],
    fork: Callable[[], int] = os.fork,
) -> bytes:
    """Fork a probe that ``serve``s a session and a driver that takes it through a load and a
    first call. In the probe, ``before()`` runs once its session runs (the state a ready worker
    waits in) and ``after()`` once the first call has been answered; what ``after`` returns
    comes back here (b"" if anything failed or took longer than 10 s). The probe is forked
    with ``fork``: the zygote's way of forking its workers."""
    from .. import rpc
    from ..rpc._loop import run
    from ..runtime._main import SESSION_LIMITS, sdk_shaped_env

    async def drive(channel: socket.socket) -> bytes:
        session = await rpc.connect(channel, limits=SESSION_LIMITS)
        await session.main.load({**_CODE, "env": sdk_shaped_env()})
        await session.main.invoke(None, "add", [1, 2], {}, None)
        answer = await session.main.invoke(None, "report", [], {}, None)
        await session.aclose()
        return bytes(answer["value"])

    global _after
    _after = after
    children: list[int] = []
    fds: list[int] = []
    try:
        driver_end, probe_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds += [driver_end.detach(), probe_end.detach()]
        fds += os.pipe()
        driver, probe, result, result_w = fds
        children.append(fork())
        if children[0] == 0:  # the probe
            _in_child(
                [driver, result, result_w], lambda: serve(socket.socket(fileno=probe), before)
            )
        children.append(os.fork())
        if children[1] == 0:  # the driver

            def report() -> int:
                with open(result_w, "wb") as out:
                    out.write(run(drive(socket.socket(fileno=driver))))
                return 0

            _in_child([probe, result], report)
        for fd in (driver, probe, result_w):
            fds.remove(fd)
            os.close(fd)
        fds.remove(result)  # the file object closes it from here
        with open(result, "rb") as source:
            if select.select([source], [], [], _TIMEOUT_S)[0]:
                return source.read()  # written at once, by the driver as it finishes
            return b""
    except OSError:  # no socket, pipe or fork to be had: no probe
        return b""
    finally:
        _after = None
        for fd in fds:
            os.close(fd)
        for pid in children:
            os.kill(pid, signal.SIGKILL)  # only ever needed if they are stuck
            os.waitpid(pid, 0)


def _in_child(close: list[int], work: Callable[[], int]) -> NoReturn:
    """In a probe's freshly forked child: close the other children's fds, die with the zygote,
    run ``work``, exit with its code (1 if it raised)."""
    code = 1
    try:
        for fd in close:
            os.close(fd)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        sc.prctl(sc.PR_SET_DUMPABLE, 1)  # else its /proc/self files are root's, not its own
        code = work()
    finally:
        os._exit(code)
