"""Work a binding call starts that must end before the call does, even when the call is
cancelled (a worker gone mid-call cancels the call's task, often twice: the session's end, then
the worker's stop), and locks held for exactly as long as such work runs."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["LocksByName", "holding", "to_the_end"]

_T = TypeVar("_T")


async def to_the_end(work: Awaitable[_T]) -> _T:
    """``work``'s result. However often the caller is cancelled meanwhile, it waits for
    ``work`` to end and is cancelled only then: a file operation, a commit or a statement is
    never cut short, nor left running behind a caller that goes on as if it were over.
    ``work``'s own exception is taken either way, so none is logged as never retrieved."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller is told it was cancelled instead
        raise cancelled
    return task.result()


class LocksByName:
    """An ``asyncio.Lock`` per name, made on first use and kept only while a caller holds or
    waits for it (weakly: names come from workers, and a lock per name ever used would grow
    without end)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def of(self, name: str) -> asyncio.Lock:
        """The lock of ``name``."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock


async def holding(
    lock: asyncio.Lock, start: Callable[[], Awaitable[_T]], wait_s: float | None = None
) -> _T:
    """The result of the work ``start()`` begins once ``lock`` is taken (waited for at most
    ``wait_s`` seconds: TimeoutError past it, nothing started; the work itself has no limit
    here). The lock is let go when the
    work ends, by the work's own completion: not by this caller, which may be cancelled, or
    even dropped undriven by a session that closes in the same loop turn, while the work runs
    on (``to_the_end``)."""
    async with asyncio.timeout(wait_s):
        await lock.acquire()
    try:
        task = asyncio.ensure_future(start())
    except BaseException:
        lock.release()
        raise
    task.add_done_callback(lambda _: lock.release())
    return await to_the_end(task)
