"""Workers the Loader keeps ready (started, session open, their first call's pages copied in
ahead) behave exactly like fresh ones: the zygote's warm-up leaves nothing a tenant could see,
and ready workers stop with the Loader."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests._proc import pid_exists
from workerloader import Loader, WorkerCode

PROBE = """
import sys
import workers
from workers import WorkerEntrypoint

class Probe(WorkerEntrypoint):
    async def state(self):
        finders = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "ModuleMap"]
        return {
            "warmup_module": "_workerloader_warmup" in sys.modules,
            "snippet_module": "execute" in sys.modules,
            "data": sorted(workers.modules),
            "finders": len(finders),
            "env": self.env["NAME"],
        }
"""


def probe_code() -> WorkerCode:
    return WorkerCode(
        main_module="main.py",
        modules={"main.py": PROBE, "config.json": {"json": {"a": 1}}},
        env={"NAME": "probe"},
    )


async def _wait_ready(loader: Loader, count: int) -> None:
    for _ in range(400):
        if len(loader._ready) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the Loader kept {len(loader._ready)} ready workers, not {count}")


async def test_a_ready_worker_shows_no_trace_of_the_zygotes_warm_up(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=4) as loader:
        await _wait_ready(loader, 2)
        state = await loader.get("p", probe_code).get_entrypoint("Probe").state()
        assert state == {
            "warmup_module": False,
            "snippet_module": False,
            "data": ["config.json"],
            "finders": 1,
            "env": "probe",
        }


async def test_no_ready_worker_outlives_the_loader(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=4) as loader:
        await _wait_ready(loader, 2)
        pids = [process.pid for process, _ in loader._ready]
    for _ in range(200):
        alive = [pid for pid in pids if pid_exists(pid)]
        if not alive:
            break
        await asyncio.sleep(0.01)
    assert not alive
