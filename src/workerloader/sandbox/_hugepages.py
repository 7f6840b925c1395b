"""Put the zygote's heap in huge pages before it forks workers.

Each fork copies the page table entries of the zygote's written memory (~15 MB: ~3,900
entries), and each worker's exit takes them down again. In a stream of cold workers these two
took a seventh of all the machine's CPU (system-wide perf: ``copy_page_range`` in the zygote's
forks, ``unmap_page_range`` in workers' exits). ``MADV_COLLAPSE`` (Linux 6.1+, whatever the
system's THP setting) moves a range's pages into 2 MB transparent huge pages, in place.

What that buys: one entry maps 2 MB where 512 did, but only until a process writes to a huge
page it shares. The writer's entry is then split into 4 KB ones, and the page written is copied
alone; so a worker's private memory does not grow. The zygote's own writes split its entries
within its first batch of forks. The pages stay huge underneath, and the kernel copies and
takes down the entries of one huge page in batches rather than one page at a time. Measured
(``docs/design.md``): less CPU per worker, the worker's and the zygote's together, and more new
workers a second.

The heap must lie in long stretches for 2 MB-aligned pieces of it to exist: the workers'
interpreter uses the C allocator (``PYTHONMALLOC=malloc``, set by the host), whose heap is one
mapping, not pymalloc's 1 MB arenas scattered across the address space. The holes in a
collapsed piece are filled with zeroed pages (~0.5–0.9 MB in the zygote, shared by every
worker).
"""

from __future__ import annotations

import contextlib

from . import _syscalls as sc

__all__ = ["collapse_heap"]


def collapse_heap() -> None:
    """Move every 2 MB-aligned piece of this process's private anonymous memory (the heap and
    other anonymous mappings; not files' pages, shared memory or the stack) into huge pages.
    Best effort, silent: nothing happens where the kernel cannot (older than 6.1, without
    THP, or THP disabled for this process). Reads ``/proc/self/maps``; leaves a few freed
    blocks behind (call before ``_fill.fill_free_blocks``)."""
    ranges: list[tuple[int, int]] = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1] == "rw-p" and (len(fields) < 6 or fields[5] == "[heap]"):
                low, _, high = fields[0].partition("-")
                ranges.append((int(low, 16), int(high, 16)))
    for start, end in ranges:
        # The kernel takes the 2 MB-aligned pieces inside the range, and goes on past most
        # that it cannot collapse (its error then names the last of those).
        with contextlib.suppress(OSError):
            sc.madvise(start, end - start, sc.MADV_COLLAPSE)
