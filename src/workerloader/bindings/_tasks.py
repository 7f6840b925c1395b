"""Work a binding call starts that must end before the call does, even when the call is
cancelled (a worker gone mid-call cancels the call's task, often twice: the session's end, then
the worker's stop)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["to_the_end"]

_T = TypeVar("_T")


async def to_the_end(work: Awaitable[_T]) -> _T:
    """``work``'s result. However often the caller is cancelled meanwhile, it waits for
    ``work`` to end and is cancelled only then: a file operation, a commit or a statement is
    never cut short, nor left running behind a caller that goes on as if it were over (what it
    holds, a lock or a turn, is let go only after it). ``work``'s own exception is taken either
    way, so none is logged as never retrieved."""
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
