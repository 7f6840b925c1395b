"""The zygote's heap in huge pages (``_hugepages``), and the allocator that makes it one
stretch: workers run on the C allocator, not pymalloc."""

from __future__ import annotations

import struct
from pathlib import Path

import psutil
import pytest

from tests._proc import script_json
from workerloader import Loader, WorkerCode
from workerloader.sandbox import _syscalls as sc

_HUGE = 2 << 20


def _collapse_works() -> bool:
    """Whether this kernel collapses a piece of private memory (6.1+, THP built in and not
    disabled for this process)."""
    address = sc.map_anonymous(2 * _HUGE)
    try:
        start = -(-address // _HUGE) * _HUGE
        sc.madvise(start, _HUGE, sc.MADV_POPULATE_WRITE)
        sc.madvise(start, _HUGE, sc.MADV_COLLAPSE)
    except OSError:
        return False
    finally:
        sc.unmap(address, 2 * _HUGE)
    return True


needs_collapse = pytest.mark.skipif(
    not _collapse_works(), reason="this kernel cannot collapse memory into huge pages"
)

COLLAPSE = """
import json
import sys

from workerloader.sandbox._hugepages import collapse_heap


def huge_kb():
    with open("/proc/self/smaps_rollup") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))


kept = [bytes(range(i % 200, i % 200 + 50)) for i in range(200_000)]  # ~16 MB of small objects
before = huge_kb()
collapse_heap()
print(json.dumps({
    "before_kb": before,
    "after_kb": huge_kb(),
    "intact": all(k == bytes(range(i % 200, i % 200 + 50)) for i, k in enumerate(kept)),
}), file=sys.__stdout__)
"""


@needs_collapse
def test_the_heap_is_collapsed_into_huge_pages_in_place() -> None:
    report = script_json(COLLAPSE, env={"PYTHONMALLOC": "malloc"})
    assert report["intact"]  # the objects are where they were, with their contents
    assert report["after_kb"] - report["before_kb"] >= 8 * 1024  # most of the 16 MB heap


def _pages_in_huge_pages(pid: int) -> int:
    """How many of ``pid``'s heap pages belong to a huge page, mapped whole or by 4 KB entries
    (``AnonHugePages`` counts only the first; the zygote's own writes split its entries)."""
    with open(f"/proc/{pid}/maps") as maps:
        heaps = [
            [int(x, 16) for x in line.split()[0].split("-")]
            for line in maps
            if line.rstrip().endswith("[heap]")
        ]
    count = 0
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
        for start, end in heaps:
            pagemap.seek(start // 4096 * 8)
            entries = struct.unpack(f"{(end - start) // 4096}Q", pagemap.read((end - start) // 512))
            for entry in entries:
                if entry >> 63 & 1:  # present: bits 0-54 are its frame number (seen by root)
                    flags.seek((entry & ((1 << 55) - 1)) * 8)
                    (page_flags,) = struct.unpack("Q", flags.read(8))
                    count += page_flags >> 22 & 1  # KPF_THP
    return count


@needs_collapse
async def test_the_zygote_forks_from_a_heap_in_huge_pages(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        launcher = loader._sandbox._proc
        assert launcher is not None
        (zygote,) = psutil.Process(launcher.pid).children()
        assert _pages_in_huge_pages(zygote.pid) >= 2 * 512  # 4 MB of its ~12 MB heap at least


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
