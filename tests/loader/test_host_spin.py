"""The host's spinning loop during a worker's first call: it does not spin while it waits for
the answer (the worker and the zygote need the CPU), and spins again once the worker calls the
host (binding calls come in streams). Run on the loop the service runs on."""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from workerloader import Loader, RpcTarget, WorkerCode, WorkerStub
from workerloader.rpc._loop import run

MAIN = """
import asyncio
from workers import WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def ping_later(self, seconds):
        await asyncio.sleep(seconds)
        return await self.env.PROBE.ping()

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)
        return "slept"

    async def fail_later(self, seconds):
        await asyncio.sleep(seconds)
        raise ValueError("no")
"""


def _pauses() -> int:
    selector = vars(asyncio.get_running_loop())["_selector"]
    assert isinstance(selector, selectors.EpollSelector)
    paused: int = vars(selector)["paused"]
    return paused


class _Probe(RpcTarget):
    def __init__(self) -> None:
        self.pauses_seen: list[int] = []

    async def ping(self) -> str:
        self.pauses_seen.append(_pauses())
        return "pong"


async def _in_flight(stub: WorkerStub, calls: int) -> None:
    """Until ``calls`` calls are running in the stub's worker (started within 30 s)."""
    deadline = time.monotonic() + 30
    while stub._worker is None or stub._worker.active_calls < calls:
        assert time.monotonic() < deadline, "the calls did not start"
        await asyncio.sleep(0.005)


def _on_the_service_loop(
    tmp_path: Path, scenario: Callable[[Loader, WorkerStub], Awaitable[Any]]
) -> tuple[Any, _Probe]:
    probe = _Probe()

    async def main() -> Any:
        async with Loader(tmp_path / "data", pool_size=2) as loader:
            code = WorkerCode(
                main_module="main.py", modules={"main.py": MAIN}, env={"PROBE": probe}
            )
            return await scenario(loader, loader.get("w", lambda: code))

    return run(main()), probe


def test_a_first_call_pauses_the_spin_until_the_worker_calls_the_host(tmp_path: Path) -> None:
    async def scenario(loader: Loader, stub: WorkerStub) -> list[object]:
        first = asyncio.ensure_future(stub.get_entrypoint().ping_later(1.0))
        await _in_flight(stub, 1)
        during = _pauses()  # the worker has not called the host yet
        answer = await first
        after = _pauses()
        warm = await stub.get_entrypoint().ping_later(0)  # a warm call: no pause
        return [during, answer, after, warm, _pauses()]

    results, probe = _on_the_service_loop(tmp_path, scenario)
    assert results == [1, "pong", 0, "pong", 0]
    assert probe.pauses_seen == [0, 0]  # ended by the worker's call; none for a warm call


def test_overlapping_first_calls_all_resume_the_spin_at_a_binding_call(tmp_path: Path) -> None:
    async def scenario(loader: Loader, stub: WorkerStub) -> list[object]:
        api = stub.get_entrypoint()
        # Three first calls at once (the worker's load goes with the first of them).
        calls = [asyncio.ensure_future(api.sleep(2.0)) for _ in range(2)]
        calls.append(asyncio.ensure_future(api.ping_later(1.0)))
        await _in_flight(stub, 3)
        during = _pauses()
        pinged = await calls[2]
        between = _pauses()  # the two sleepers still run: their pauses ended with the ping
        return [during, pinged, between, await asyncio.gather(*calls[:2]), _pauses()]

    results, probe = _on_the_service_loop(tmp_path, scenario)
    assert results == [3, "pong", 0, ["slept", "slept"], 0]
    assert probe.pauses_seen == [0]


def test_a_first_call_that_fails_or_is_cancelled_leaves_no_pause(tmp_path: Path) -> None:
    async def scenario(loader: Loader, stub: WorkerStub) -> list[int]:
        api = stub.get_entrypoint()
        failing = asyncio.ensure_future(api.fail_later(0.2))
        await _in_flight(stub, 1)
        with pytest.raises(ValueError, match="no"):
            await failing
        after_failure = _pauses()
        other = loader.get(
            "other", lambda: WorkerCode(main_module="main.py", modules={"main.py": MAIN})
        )
        cancelled = asyncio.ensure_future(other.get_entrypoint().sleep(5.0))
        await _in_flight(other, 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return [after_failure, _pauses()]

    results, _ = _on_the_service_loop(tmp_path, scenario)
    assert results == [0, 0]
