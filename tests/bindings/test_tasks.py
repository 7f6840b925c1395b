"""``to_the_end`` and ``holding``: work a binding call starts ends before the call does, however
the call is cancelled, and a lock held for such work is let go when the work ends, not when its
caller goes."""

from __future__ import annotations

import asyncio
import gc

import pytest

from workerloader.bindings._tasks import holding, to_the_end


async def test_to_the_end_gives_the_result_or_the_works_error() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 4

    async def fail() -> None:
        raise OSError("no")

    assert await to_the_end(answer()) == 4
    with pytest.raises(OSError, match=r"^no$"):
        await to_the_end(fail())


async def test_a_caller_cancelled_twice_waits_for_the_work_then_is_cancelled() -> None:
    ended = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        ended.set()

    call = asyncio.ensure_future(to_the_end(work()))
    await asyncio.sleep(0.01)
    call.cancel()
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert ended.is_set()  # the call ended only after its work


async def test_the_works_error_after_a_cancel_is_not_left_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail() -> None:
        await asyncio.sleep(0.02)
        raise OSError("/host/path")

    call = asyncio.ensure_future(to_the_end(fail()))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_holding_lets_the_lock_go_when_the_work_ends_even_if_the_caller_is_dropped() -> None:
    lock = asyncio.Lock()
    release = asyncio.Event()

    async def work() -> None:
        await release.wait()

    # A session closing in the same loop turn throws one cancel into the caller and drops it
    # undriven: its own cleanup runs at once, the work's does not.
    caller = holding(lock, work)
    step = caller.send(None)
    assert lock.locked()
    del step
    caller.close()  # dropped
    gc.collect()
    assert lock.locked()  # the work still runs
    release.set()
    await asyncio.sleep(0.01)
    assert not lock.locked()


async def test_holding_waits_for_the_lock_at_most_its_time_and_starts_nothing() -> None:
    lock = asyncio.Lock()
    await lock.acquire()
    started = []

    async def work() -> None:
        started.append(1)

    with pytest.raises(TimeoutError):
        await holding(lock, work, wait_s=0.02)
    assert started == []
    lock.release()
    await holding(lock, work)
    assert started == [1]
    assert not lock.locked()
