"""The host's spinning loop during a worker's first call: it does not spin while it waits for
the answer (the worker and the zygote need the CPU), and spins again once the worker calls the
host (binding calls come in streams). Run on the loop the service runs on."""

from __future__ import annotations

import asyncio
import selectors
from pathlib import Path

from workerloader import Loader, RpcTarget, WorkerCode
from workerloader.rpc._loop import run

MAIN = """
import asyncio
from workers import WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def run(self):
        await asyncio.sleep(0.3)
        return await self.env.PROBE.ping()
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


def test_a_first_call_pauses_the_spin_until_the_worker_calls_the_host(tmp_path: Path) -> None:
    probe = _Probe()

    async def main() -> tuple[int, str, int, int]:
        async with Loader(tmp_path / "data", pool_size=2) as loader:
            code = WorkerCode(
                main_module="main.py", modules={"main.py": MAIN}, env={"PROBE": probe}
            )
            stub = loader.get("w", lambda: code)
            first = asyncio.ensure_future(stub.get_entrypoint().run())
            await asyncio.sleep(0.15)
            during = _pauses()  # the first call is in flight, the worker has not called yet
            answer = await first
            after = _pauses()
            assert await stub.get_entrypoint().run() == "pong"  # a warm call: no pause
            return during, answer, after, _pauses()

    during, answer, after, after_warm = run(main())
    assert answer == "pong"
    assert during == 1
    assert probe.pauses_seen == [0, 0]  # ended by the worker's call; none for a warm call
    assert after == after_warm == 0
