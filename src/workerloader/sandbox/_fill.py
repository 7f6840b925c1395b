"""Fill the zygote's free memory blocks before it forks, so that workers allocate on fresh pages.

A forked worker copies every shared page it writes to. Its new objects would otherwise land in
the free blocks scattered through the zygote's heap (pymalloc's partly used pools, glibc's
per-size cache and its bins of free chunks), a few per page, each first write copying a whole
page: the event loop a worker creates dirtied ~100 pages that way. Once those blocks are taken
here, a worker's allocations come from new pools and the top of the heap, densely. The blocks
stay allocated for the zygote's lifetime (~0.5–1 MB, shared by every worker).

Taking glibc's bins as well as its cache (``_fill_malloc_bins``; 7 blocks of each cached size
before, whether cached or not) cut a worker's page faults from start to first answer by ~40 (of
~430), and in sixteen alternating rounds of two Loaders: zygote and worker CPU per worker 3.77
against 4.12 ms (lower in 15), cold call p50 0.91 against 1.04 ms (lower in 14), new workers/s
388 against 364 (higher in 12). Taking each cached size only until a block comes from the top
(rather than 7 blocks of it) leaves the zygote's anonymous memory at 14.4 MB, against 14.6 MB
(the 7 blocks taken before the bins) or 15.0 MB (after them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys

__all__ = ["fill_free_blocks"]

_kept: list[object] = []  # the filling objects and blocks, alive as long as the zygote

_POOL_LINE = re.compile(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def _pymalloc_free_blocks() -> dict[int, int]:
    """Free blocks in partly used pymalloc pools, by block size (``sys._debugmallocstats``,
    which CPython prints to the C stderr; empty where that is unavailable)."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return {}
    # A memory file, not tempfile: importing that pulls shutil and three compression modules
    # (~0.5 MB and 45 mappings) into the zygote, which every worker would copy and tear down.
    with open(os.memfd_create("mallocstats"), "w+") as out:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    free: dict[int, int] = {}
    for line in text.splitlines():
        if line.startswith("# arenas"):
            break
        match = _POOL_LINE.match(line)
        if match:
            _, size, _, _, avail = map(int, match.groups())
            free[size] = avail
    return free


def _object_of_block_size(size: int, i: int) -> object:
    if size == 16:
        return object()  # 16 bytes, no collector header
    if size == 32:
        return float(i) + 0.5  # 24 bytes (floats reuse a small free list first)
    return bytes(size - 33)  # a bytes object of n bytes takes 33 + n


def _fill_pymalloc() -> int:
    filled = 0
    for _ in range(3):  # filling allocates a little itself; a few rounds converge
        free = _pymalloc_free_blocks()
        count = sum(free.values())
        if not count:
            break
        holder: list[object] = [None] * count
        i = 0
        for size, blocks in free.items():
            for _ in range(blocks):
                holder[i] = _object_of_block_size(size, i)
                i += 1
        _kept.append(holder)
        filled += count
    return filled


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_CHUNK_SIZES = [*range(1 << 17, 1 << 12, -(1 << 12)), *range(1 << 12, 16, -16)]
"""The request sizes that take glibc's free chunks, largest first (each request takes the
smallest free chunk that fits and leaves the rest free for a smaller one): 4 KB steps down to
4 KB, then glibc's own 16-byte steps. Larger free chunks are taken piecewise; requests above
glibc's mapping threshold (128 KB at first) get memory of their own, which is given back."""


_CACHED_SIZE = 1040
"""The largest chunk glibc keeps in its per-thread cache (tcache) when freed."""


def _fill_malloc_bins() -> int:
    """Take the free chunks glibc keeps: in its per-thread cache (up to 7 of each size up to
    1 KB) and in its bins, wherever earlier frees left them inside the heap, where new blocks
    (a worker's, or the packed code of ``_pack``) would land among shared pages. Each size is
    requested until a block comes from the top of the heap instead: that one is given back,
    or kept if freeing it would put it in the cache."""
    try:
        libc = ctypes.CDLL(None)
        malloc, free, sbrk, mallinfo2 = libc.malloc, libc.free, libc.sbrk, libc.mallinfo2
    except (OSError, AttributeError):  # not glibc (2.33+)
        return 0
    malloc.restype = sbrk.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]
    sbrk.argtypes = [ctypes.c_ssize_t]
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    top = sbrk(0) - info.keepcost  # where the top chunk starts
    # A bound in case the heap is not laid out as assumed (its top elsewhere than at the
    # break): never take much more than the bins held.
    # (The cache's chunks count as in use there: up to 7 of each size, ~250 KB, on top.)
    room = 2 * (info.fordblks - info.keepcost) + (1 << 19)
    blocks: list[int] = []
    for size in _CHUNK_SIZES:
        while room >= size:
            block = malloc(size - 8)
            if not block:
                break
            if block >= top:  # no free chunk of this size is left
                if size <= _CACHED_SIZE:
                    blocks.append(block)  # freed, it would go to the cache, to be handed out
                else:
                    free(block)
                break
            blocks.append(block)
            room -= size
    _kept.append(blocks)
    return len(blocks)


def fill_free_blocks() -> int:
    """Take the zygote's free small blocks (see the module doc); the number taken. Call right
    before forking workers, after the last allocation the zygote keeps (or before making
    objects that should lie together: ``_pack``)."""
    taken = 0
    with contextlib.suppress(OSError, ValueError):
        taken += _fill_pymalloc()
    return taken + _fill_malloc_bins()
