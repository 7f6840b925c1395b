"""The zygote's heap in huge pages (``_hugepages``), and the allocator that makes it one
stretch: workers run on the C allocator, not pymalloc."""

from __future__ import annotations

from pathlib import Path

from tests._proc import script_json
from workerloader import Loader, WorkerCode

COLLAPSE = """
import json
import sys

from workerloader.sandbox._hugepages import collapse_heap


def huge_kb():
    with open("/proc/self/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))


kept = [bytes(range(i % 200, i % 200 + 50)) for i in range(200_000)]  # ~16 MB of small objects
before = huge_kb()
collapsed = collapse_heap()
print(json.dumps({
    "before_kb": before,
    "collapsed_kb": collapsed // 1024,
    "after_kb": huge_kb(),
    "intact": all(k == bytes(range(i % 200, i % 200 + 50)) for i, k in enumerate(kept)),
}), file=sys.__stdout__)
"""


def _thp_disabled() -> bool:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
        return "[never]" in setting.read()


def test_the_heap_is_collapsed_into_huge_pages_in_place() -> None:
    report = script_json(COLLAPSE, env={"PYTHONMALLOC": "malloc"})
    assert report["intact"]  # the objects are where they were, with their contents
    if _thp_disabled():  # the machine's choice: nothing is collapsed, nothing fails
        assert report["collapsed_kb"] == 0
        return
    assert report["collapsed_kb"] >= 8 * 1024  # most of the 16 MB heap
    assert report["after_kb"] >= report["before_kb"] + report["collapsed_kb"]


RETURNS_BLOCKS = (
    "import sys\n"
    "from workers import WorkerEntrypoint\n"
    "class E(WorkerEntrypoint):\n"
    "    async def blocks(self):\n"
    "        return sys.getallocatedblocks()\n"  # pymalloc's count: 0 without it
)


async def test_workers_run_on_the_c_allocator(tmp_path: Path) -> None:
    code = WorkerCode(main_module="main.py", modules={"main.py": RETURNS_BLOCKS})
    async with Loader(tmp_path / "data", pool_size=1) as loader:
        assert await loader.get("w", lambda: code).get_entrypoint("E").blocks() == 0
