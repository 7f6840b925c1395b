"""An asyncio event loop that spins briefly before sleeping, for low-latency RPC.

On this kind of machine a process woken from ``epoll_wait`` by a peer's write takes ~20 µs to run
again, which dominates a cross-process round trip (~115 µs on a plain asyncio loop). Right after
it handled an event, this loop polls without blocking for up to ``spin_us`` before it blocks: a
reply that arrives within that window is picked up at once. An idle loop blocks as usual after
one window, so the cost is at most ``spin_us`` of CPU per burst of activity, and between polls
it yields the CPU to any process waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import selectors
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_SPIN_US",
    "SpinPause",
    "new_event_loop",
    "renew_descriptors",
    "run",
    "set_spin",
    "spin_paused",
    "spin_unless",
]

DEFAULT_SPIN_US = 200
"""Spin window, measured on this machine: 200 µs catches the reply of a typical worker call
(50 µs caught bare RPC replies, but a warm worker call took 230 µs p50 at 50 and 66 µs at 200)."""

_T = TypeVar("_T")


class _SpinningSelector(selectors.EpollSelector):
    def __init__(self, spin_ns: int) -> None:
        super().__init__()
        self._spin_ns = spin_ns
        self._when: Callable[[], bool] | None = None
        self.paused = 0  # spin_paused blocks in progress

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if (
            (timeout is not None and timeout <= 0)
            or not self._spin_ns
            or self.paused
            or (self._when is not None and not self._when())
        ):
            return super().select(timeout)
        deadline = time.perf_counter_ns() + self._spin_ns
        if timeout is not None:
            deadline = min(deadline, time.perf_counter_ns() + int(timeout * 1e9))
        while True:
            ready = super().select(0)
            if ready or time.perf_counter_ns() >= deadline:
                break
            # A spin must not keep a process that has work from this CPU (on two cores the
            # service, a worker and a client take turns): yielding costs nothing when none
            # waits. Alternating with and without, 10 rounds of warm fetches on four
            # connections: 3,022 against 2,468 req/s (10 of 10), CPU a request lower in all.
            os.sched_yield()
        if ready:
            return ready
        return super().select(timeout)


def new_event_loop(spin_us: int = DEFAULT_SPIN_US) -> asyncio.AbstractEventLoop:
    """A selector event loop that spins ``spin_us`` before blocking (0: not until
    ``set_spin``)."""
    return asyncio.SelectorEventLoop(_SpinningSelector(max(spin_us, 0) * 1000))


_retired: list[object] = []  # epoll objects renew_descriptors replaced: never closed


def renew_descriptors(loop: asyncio.AbstractEventLoop) -> None:
    """Give ``loop`` (made by ``new_event_loop`` before this process was forked, and not run
    since) an epoll instance and a self-pipe of its own: a forked child shares its parent's
    epoll instance, and the child may already have closed the inherited descriptors.

    The old epoll object is kept, never closed here: its descriptor number may belong to
    something else by now (the old sockets are detached, which closes nothing).
    """
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, _SpinningSelector):
        raise TypeError("not a loop made by new_event_loop")
    inner = vars(selector)
    _retired.append(inner["_selector"])
    inner["_selector"] = select.epoll()
    inner["_fd_to_key"].clear()  # the self-pipe's registration, in the old instance
    state = vars(loop)
    for name in ("_ssock", "_csock"):
        state[name].detach()  # its number is not ours to close any more
    state["_internal_fds"] -= 1
    loop._make_self_pipe()  # type: ignore[attr-defined]


def set_spin(spin_us: int, when: Callable[[], bool] | None = None) -> None:
    """Change the spin window of the running loop, if ``new_event_loop`` made it; with
    ``when``, spin only while it returns True (a worker spins while it waits for the host's
    answers, or once calls come in a stream: spinning otherwise would only burn CPU)."""
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    if isinstance(selector, _SpinningSelector):
        selector._spin_ns = max(spin_us, 0) * 1000
        selector._when = when


def spin_unless(busy: Callable[[], bool]) -> Callable[[], None]:
    """Make the running loop (if ``new_event_loop`` made it, with no condition of its own yet)
    not spin while ``busy()`` is true: for a process whose background work (starting and
    stopping workers) needs the CPU a spin would take. Returns the undo."""
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    if not isinstance(selector, _SpinningSelector) or selector._when is not None:
        return lambda: None
    selector._when = lambda: not busy()

    def undo() -> None:
        selector._when = None

    return undo


class SpinPause:
    """A pause of the running loop's spin (see ``spin_paused``), which ``end`` may end early."""

    def __init__(self, selector: _SpinningSelector | None) -> None:
        self._selector = selector
        if selector is not None:
            selector.paused += 1

    def end(self) -> None:
        """Let the loop spin again (unless other pauses hold). Safe twice."""
        if self._selector is not None:
            self._selector.paused -= 1
            self._selector = None


@contextlib.contextmanager
def spin_paused() -> Iterator[SpinPause]:
    """While inside (or until the pause's ``end``), the running loop (if ``new_event_loop``
    made it) does not spin: for a wait known to outlast the spin window, such as a worker's
    first call (~1 ms), where spinning would only take CPU from the processes doing the work.
    Nests; any number at once."""
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    pause = SpinPause(selector if isinstance(selector, _SpinningSelector) else None)
    try:
        yield pause
    finally:
        pause.end()


def run(main: Coroutine[Any, Any, _T], *, spin_us: int = DEFAULT_SPIN_US) -> _T:
    """Like ``asyncio.run``, on a spinning loop."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(spin_us)) as runner:
        return runner.run(main)
