"""The zygote, and so every pooled worker, runs 10 nice levels below the host, and a worker
handed out runs at the host's own priority: starting workers in the background yields to the
calls in flight."""

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
