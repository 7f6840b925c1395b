"""Pooled workers start at a low CPU priority (the zygote's), and a worker runs its code at the
normal one: starting workers in the background never slows the calls in flight."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from workerloader import Loader, WorkerCode

MAIN = """
import os
from workers import WorkerEntrypoint

class Probe(WorkerEntrypoint):
    async def nice(self):
        return os.getpriority(os.PRIO_PROCESS, 0)
"""


def code() -> WorkerCode:
    return WorkerCode(main_module="main.py", modules={"main.py": MAIN})


async def test_a_worker_runs_its_code_at_normal_priority(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        first = loader.get("a", code).get_entrypoint("Probe")
        assert await first.nice() == 0
        uncached = await loader.load(code())  # an uncached worker too
        assert await uncached.get_entrypoint("Probe").nice() == 0


async def test_ready_workers_wait_at_the_zygotes_lower_priority(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=4) as loader:
        for _ in range(400):
            if loader._ready:
                break
            await asyncio.sleep(0.01)
        process, _ = loader._ready[0]
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == 10
