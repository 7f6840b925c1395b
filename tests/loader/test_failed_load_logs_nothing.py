"""A worker killed while its code loads: the first call, sent ahead of the load check
(``.send()``), is never awaited; its SessionClosed must not surface as asyncio's "Future
exception was never retrieved" (an ERROR log line per failed worker start)."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest

from workerloader import CpuLimitExceeded, Limits, Loader, WorkerCode

SPINS_AT_IMPORT = "while True:\n    pass\n"


async def test_a_worker_killed_while_loading_leaves_no_unretrieved_future(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    code = WorkerCode(
        main_module="main.py", modules={"main.py": SPINS_AT_IMPORT}, limits=Limits(cpu_ms=50)
    )
    async with Loader(tmp_path / "data", pool_size=1) as loader:
        stub = loader.get("w", lambda: code)
        with pytest.raises(CpuLimitExceeded):
            await stub.fetch("https://w/")
        del stub
        await loader.evict("w")  # the cached stub holds its dead worker until then
        for _ in range(5):
            gc.collect()
            await asyncio.sleep(0)
    gc.collect()
    unretrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert unretrieved == []
