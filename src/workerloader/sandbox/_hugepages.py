"""Back the zygote's heap with huge pages before it forks workers.

Each fork copies the page table entries of the zygote's written memory (~15 MB: ~3,900
entries), and each worker's exit takes them down again. In a stream of cold workers these two
took a seventh of all the machine's CPU (system-wide perf: ``copy_page_range`` in the zygote's
fork, ``unmap_page_range`` in each exit). One entry of a transparent huge page maps 2 MB, where
512 entries of 4 KB pages did; ``MADV_COLLAPSE`` (Linux 6.1+) puts a range's pages into huge
pages in place, whatever the system's THP setting short of ``never``.

A worker's private memory does not grow for it: a worker that writes to a shared huge page has
its own entry split into 4 KB ones, and copies only the 4 KB page it wrote. The zygote's own
writes after a fork split its entries as well; the pages stay huge underneath, and the kernel
copies and frees the entries of one in batches.

It needs the heap in long, 2 MB-aligned stretches: the workers' interpreter uses the C
allocator (``PYTHONMALLOC=malloc``, set by the host), whose heap is one mapping, not pymalloc's
1 MB arenas scattered across the address space.
"""

from __future__ import annotations

import contextlib
import os

from . import _syscalls as sc

__all__ = ["collapse_heap"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HUGE = _PAGE * (_PAGE // 8)  # what one page-middle-directory entry maps: 2 MB on x86-64


def collapse_heap() -> int:
    """Collapse every huge-page-aligned stretch of this process's private anonymous memory
    (the heap and other anonymous mappings) into huge pages; the bytes collapsed. Best effort:
    0 where the kernel cannot (older than 6.1, THP ``never``). Reads ``/proc/self/maps``."""
    collapsed = 0
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for fields in regions:
        if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue  # a file's pages, a stack, or shared memory
        start, end = (int(x, 16) for x in fields[0].split("-"))
        for address in range(-(-start // _HUGE) * _HUGE, end - _HUGE + 1, _HUGE):
            with contextlib.suppress(OSError):
                sc.madvise(address, _HUGE, sc.MADV_COLLAPSE)
                collapsed += _HUGE
    return collapsed
