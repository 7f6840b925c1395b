"""The zygote, and so every pooled worker, runs 10 nice levels below the host, a worker
handed out runs at the host's own priority, and a worker being stopped at the lowest: starting
and ending workers in the background yields to the calls in flight."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from workerloader import Loader, WorkerCode
from workerloader.sandbox import _host

MAIN = """
import os
from workers import WorkerEntrypoint

class Probe(WorkerEntrypoint):
    async def nice(self):
        return os.getpriority(os.PRIO_PROCESS, 0)
"""


def code() -> WorkerCode:
    return WorkerCode(main_module="main.py", modules={"main.py": MAIN})


def host_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


async def test_a_worker_runs_its_code_at_the_hosts_priority(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        first = loader.get("a", code).get_entrypoint("Probe")
        assert await first.nice() == host_nice()
        uncached = await loader.load(code())  # an uncached worker too
        assert await uncached.get_entrypoint("Probe").nice() == host_nice()


async def test_the_zygote_runs_lower_and_workers_it_hands_out_do_not(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=4) as loader:
        zygote = loader._sandbox._proc
        assert zygote is not None
        assert os.getpriority(os.PRIO_PROCESS, zygote.pid) == min(host_nice() + 10, 19)
        for _ in range(400):
            if loader._ready:
                break
            await asyncio.sleep(0.01)
        process, _ = loader._ready[0]
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == host_nice()


async def test_a_stopped_worker_is_killed_at_the_lowest_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_kill: list[int] = []  # the priority of each live worker as the SIGKILL goes out
    kill = _host._kill

    def look_then_kill(pidfd: int) -> None:
        # Reaped already (the release's second kill may come before or after): no pid.
        with contextlib.suppress(OSError, ValueError):
            at_kill.append(os.getpriority(os.PRIO_PROCESS, _host._pid_of(pidfd)))
        kill(pidfd)

    monkeypatch.setattr(_host, "_kill", look_then_kill)
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        stub = loader.get("a", code)
        assert await stub.get_entrypoint("Probe").nice() == host_nice()
        await stub.aclose()
        assert at_kill, "the worker was not killed"
        assert set(at_kill) == {19}
