"""Two real processes over ``socket.socketpair()``, and the spinning event loop of ``_loop``.

The parent forks a child that serves a ``Worker`` over its end of the pair with
``workerloader.rpc.connect`` inside ``_loop.run`` until the parent closes, then ``os._exit(0)``.
The tests are plain functions (not ``async``): the fork happens before any event loop runs in
this process, and the parent then runs its side in a loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import selectors
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from workerloader import RemoteError, SessionClosed
from workerloader.rpc import RpcSession, RpcStub, RpcTarget, _loop, connect


class WorkerError(Exception):
    """Raised in the child; crosses as RemoteError."""


class Worker(RpcTarget):
    """The child's main capability."""

    def pid(self) -> int:
        return os.getpid()

    def add(self, a: int, b: int) -> int:
        return a + b

    async def sleep_add(self, a: int, b: int) -> int:
        await asyncio.sleep(0.001)
        return a + b

    async def call_back(self, fn: RpcStub, x: object) -> object:
        return [await fn(x), await fn(x)]

    def fail(self, kind: str) -> None:
        if kind == "value":
            raise ValueError("bad input")
        raise WorkerError("worker broke")

    def echo(self, value: object) -> object:
        return value


async def _serve(sock: socket.socket, debug: bool) -> None:
    rpc = await connect(sock, Worker(), debug=debug)
    try:
        await rpc.wait_closed()
    finally:
        await rpc.aclose()


def _child(sock: socket.socket, debug: bool) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        _loop.run(_serve(sock, debug))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


@contextmanager
def forked_worker(*, debug: bool = False) -> Iterator[tuple[socket.socket, Callable[[], int]]]:
    """Fork a child serving a ``Worker``; yield (parent's socket, reap) where ``reap()`` waits
    for the child and returns its exit code. The child is killed if the test fails first."""
    parent_sock, child_sock = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        parent_sock.close()
        _child(child_sock, debug)
    child_sock.close()
    reaped: list[int] = []

    def reap() -> int:
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped.append(os.waitstatus_to_exitcode(status))
                return reaped[0]
            if time.monotonic() > deadline:
                raise AssertionError("the child did not exit within 10 s")
            time.sleep(0.005)

    try:
        yield parent_sock, reap
    finally:
        parent_sock.close()
        if not reaped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def run_parent(
    main: Callable[[RpcSession], Coroutine[Any, Any, None]], sock: socket.socket
) -> None:
    """Connect over ``sock`` and run ``main`` with the session on a fresh spinning loop."""

    async def parent() -> None:
        rpc = await connect(sock, None)
        try:
            async with asyncio.timeout(10):
                await main(rpc)
        finally:
            await rpc.aclose()
            for _ in range(3):
                await asyncio.sleep(0)

    _loop.run(parent())


def test_calls_callbacks_and_errors_cross_processes() -> None:
    calls: list[object] = []

    def callback(x: object) -> object:
        calls.append(x)
        return f"parent saw {x}"

    async def main(rpc: RpcSession) -> None:
        child_pid = await rpc.main.pid()
        assert isinstance(child_pid, int)
        assert child_pid != os.getpid()
        assert await rpc.main.add(2, 40) == 42
        assert await rpc.main.sleep_add(1, 2) == 3
        value = {"t": (1, 2), "s": {3}, "b": b"\x00", "n": None, "big": 10**30}
        assert await rpc.main.echo(value) == value
        results = await asyncio.gather(*(rpc.main.add(i, i) for i in range(50)))
        assert results == [2 * i for i in range(50)]
        # A callback the child calls back, twice.
        assert await rpc.main.call_back(callback, 7) == ["parent saw 7", "parent saw 7"]
        assert calls == [7, 7]
        # Errors cross.
        with pytest.raises(ValueError, match=r"^bad input$") as info:
            await rpc.main.fail("value")
        assert type(info.value) is ValueError
        assert info.value.args == ("bad input",)
        with pytest.raises(RemoteError) as remote:
            await rpc.main.fail("custom")
        assert remote.value.remote_type == f"{__name__}.WorkerError"
        assert remote.value.remote_message == "worker broke"
        assert remote.value.remote_traceback is None
        with pytest.raises(AttributeError) as attr:
            await rpc.main.nothing()
        assert attr.value.args == ("'Worker' object has no RPC member 'nothing'",)
        assert await rpc.main.add(1, 1) == 2
        # Releases cross too: nothing is left once the callback stub is gone over there.
        for _ in range(100):
            if rpc.table_sizes()["exports"] == 0:
                break
            await asyncio.sleep(0.01)
        assert rpc.table_sizes() == {"exports": 0, "imports": 0, "questions": 0, "answers": 0}

    with forked_worker() as (sock, reap):
        run_parent(main, sock)
        assert reap() == 0


def test_debug_child_sends_tracebacks() -> None:
    async def main(rpc: RpcSession) -> None:
        with pytest.raises(RemoteError) as remote:
            await rpc.main.fail("custom")
        tb = remote.value.remote_traceback
        assert tb is not None
        assert tb.startswith("Traceback (most recent call last):\n")
        assert tb.endswith(f"{__name__}.WorkerError: worker broke\n")

    with forked_worker(debug=True) as (sock, reap):
        run_parent(main, sock)
        assert reap() == 0


def test_pending_call_fails_when_the_child_dies() -> None:
    async def main(rpc: RpcSession) -> None:
        assert await rpc.main.add(1, 2) == 3
        pid = await rpc.main.pid()
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(SessionClosed, match=r"^the peer closed the connection$"):
            await rpc.main.sleep_add(1, 2)

    with forked_worker() as (sock, reap):
        run_parent(main, sock)
        assert reap() == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# The spinning loop


def _selector_of(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector:
    selector = vars(loop)["_selector"]
    assert isinstance(selector, selectors.BaseSelector)
    return selector


@pytest.mark.parametrize("spin_us", [50, 0])
def test_new_event_loop_runs_timers(spin_us: int) -> None:
    loop = _loop.new_event_loop(spin_us=spin_us)
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert vars(_selector_of(loop))["_spin_ns"] == spin_us * 1000
        start = time.perf_counter()
        loop.run_until_complete(asyncio.sleep(0.01))
        elapsed = time.perf_counter() - start
        assert 0.009 <= elapsed < 1.0
        assert loop.run_until_complete(_value_after(0.001, "ok")) == "ok"
    finally:
        loop.close()


def test_spin_zero_does_not_spin_until_set_spin_turns_it_on() -> None:
    loop = _loop.new_event_loop(spin_us=0)
    try:
        selector = _selector_of(loop)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert vars(selector)["_spin_ns"] == 0

        async def turn_on() -> None:
            _loop.set_spin(300)

        loop.run_until_complete(turn_on())
        assert vars(selector)["_spin_ns"] == 300_000
    finally:
        loop.close()


def count_polls(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Awaitable[int]]:
    """Count the loop's non-blocking selects (its spin); the returned coroutine function
    sleeps 5 ms and says how many happened meanwhile."""
    polls = 0
    plain_select = selectors.EpollSelector.select

    def counting_select(
        self: selectors.EpollSelector, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        nonlocal polls
        polls += timeout == 0
        return plain_select(self, timeout)

    monkeypatch.setattr(selectors.EpollSelector, "select", counting_select)

    async def polls_during_a_sleep() -> int:
        before = polls
        await asyncio.sleep(0.005)
        return polls - before

    return polls_during_a_sleep


def test_spin_paused_blocks_instead_of_polling_and_nests(monkeypatch: pytest.MonkeyPatch) -> None:
    polls_during_a_sleep = count_polls(monkeypatch)

    async def main() -> list[int]:
        spinning = await polls_during_a_sleep()
        with _loop.spin_paused():
            with _loop.spin_paused():
                nested = await polls_during_a_sleep()
            paused = await polls_during_a_sleep()
        return [spinning, nested, paused, await polls_during_a_sleep()]

    spinning, nested, paused, after = _loop.run(main(), spin_us=20_000)
    # Spinning, it polls through the whole sleep; paused, it blocks (a poll of asyncio's own,
    # for callbacks already due, may remain).
    assert spinning > 10
    assert after > 10
    assert nested <= 1
    assert paused <= 1


def test_spin_unless_blocks_while_busy_and_undo_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    polls_during_a_sleep = count_polls(monkeypatch)

    async def main() -> list[int]:
        busy = True
        undo = _loop.spin_unless(lambda: busy)
        while_busy = await polls_during_a_sleep()
        busy = False
        while_idle = await polls_during_a_sleep()
        busy = True
        undo()
        undone = await polls_during_a_sleep()
        return [while_busy, while_idle, undone]

    while_busy, while_idle, undone = _loop.run(main(), spin_us=20_000)
    assert while_busy <= 1
    assert while_idle > 10
    assert undone > 10


def test_spin_paused_is_harmless_on_a_plain_loop() -> None:
    async def main() -> str:
        with _loop.spin_paused():
            await asyncio.sleep(0)
        return "ok"

    assert asyncio.run(main()) == "ok"


def test_a_loop_made_before_a_fork_runs_in_the_child_on_descriptors_of_its_own() -> None:
    """As the zygote's loop does in each worker: made in the parent, never run there; the child
    closes what it inherited (a worker keeps only its channel), renews, and runs it."""
    loop = _loop.new_event_loop(0)
    read_end, write_end = os.pipe()
    channel, peer = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child reports over the pipe and never returns into pytest
        code = 1
        try:
            for fd in range(3, 256):
                if fd not in (write_end, channel.fileno()):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            _loop.renew_descriptors(loop)
            channel.setblocking(False)

            async def echo() -> bytes:
                data = await asyncio.get_running_loop().sock_recv(channel, 16)
                loop.call_soon_threadsafe(lambda: None)  # the new self-pipe works
                await asyncio.sleep(0.001)
                return data

            got = loop.run_until_complete(echo())
            os.write(write_end, got)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        peer.send(b"ping")
        readable, _, _ = select.select([read_end], [], [], 30)
        if not readable:
            os.kill(pid, signal.SIGKILL)
        report = os.read(read_end, 64) if readable else b"(no report in 30 s)"
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(read_end)
        channel.close()
        peer.close()
    # The child closed every descriptor it inherited but its two ends: its loop ran on its own.
    assert report == b"ping"
    # The parent's loop runs on, on its own epoll instance and self-pipe.
    assert loop.run_until_complete(_value_after(0.001, "parent")) == "parent"
    loop.close()


def test_renew_descriptors_refuses_a_plain_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(TypeError):
            _loop.renew_descriptors(loop)
    finally:
        loop.close()


def test_spinning_loop_wakes_for_socket_data() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            loop.call_later(0.005, b.send, b"ping")
            async with asyncio.timeout(5):
                return await loop.sock_recv(a, 16)
        finally:
            a.close()
            b.close()

    assert _loop.run(main(), spin_us=50) == b"ping"


def test_run_returns_the_coroutines_value() -> None:
    assert _loop.run(_value_after(0.002, 42), spin_us=50) == 42
    assert _loop.run(_value_after(0, "plain"), spin_us=0) == "plain"


async def _value_after(delay: float, value: object) -> object:
    await asyncio.sleep(delay)
    return value
