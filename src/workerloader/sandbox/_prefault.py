"""Learn which pages a worker's first call copies and maps, and do so before the call comes.

A worker forked from the zygote shares its memory until it writes a page; the kernel then
copies the page, in a page fault that costs ~4 µs on this virtual machine. A worker copies
~100 pages this way in its load and first call, while its caller waits (and ~270 more as it
starts, which nobody waits for). ``madvise(MADV_POPULATE_WRITE)`` makes those copies at about
the same cost in a worker the zygote has just forked, long before the Loader hands it out: the
faults leave the cold path; ``MADV_POPULATE_READ`` does the same for the interpreter's code and
constant pages the call reads. The pages are ones a worker copies in its first call anyway, so
an idle worker that has answered a call holds no more private memory than before (measured: two
pages more).

Which pages? Once, before it forks any worker, the zygote runs a probe of a first call
(``_probe``). The probe reads its own page map (``/proc/self/pagemap``) once its session runs,
the state a ready worker waits in, and again after that call: a page of one of the zygote's
private writable mappings that was shared at first and is now the probe's alone is one the
call copied; a page of a read-only one that was not mapped at first and is now, one it read.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import socket
from collections.abc import Callable

from . import _syscalls as sc
from ._probe import probe_first_call

__all__ = ["Runs", "learn_first_call", "populate"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_EXCLUSIVE = 1 << 56  # "page exclusively mapped" (Linux 4.2+)
_WRITTEN = _PRESENT | _EXCLUSIVE
Runs = list[tuple[int, int, bool]]
"""Page runs ``(start address, length in bytes, written)``."""

_regions: list[tuple[int, int, bool]] = []  # the zygote's private mappings, for the probe
_buffer: memoryview | None = None  # room for their page map entries, mapped before the fork


def _private_regions() -> list[tuple[int, int, bool]]:
    """This process's private readable mappings ``(start, end, writable)``, but the kernel's
    own ([vvar], [vdso], [vsyscall])."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            perms, name = fields[1], fields[5] if len(fields) > 5 else ""
            if perms[0] == "r" and perms[3] == "p" and not name.startswith("[v"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end, perms[1] == "w"))
    return regions


def _read_page_map(entries: memoryview) -> None:
    """Read this process's page map entries for ``_regions`` into ``entries``, in order."""
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        offset = 0
        for start, end, _ in _regions:
            count = (end - start) // _PAGE
            pagemap.seek(start // _PAGE * 8)
            pagemap.readinto(entries[offset : offset + count])
            offset += count


def _before_first_message() -> None:
    """In the probe, once its session runs: the page map as a ready worker's would be."""
    assert _buffer is not None
    _read_page_map(_buffer[: len(_buffer) // 2])


def touched() -> bytes:
    """In the probe: the runs of pages its first call wrote to or read from, as
    ``(start, length, write)`` triples of int64.

    Written: pages of private writable mappings that were shared when the session started and
    that the probe now holds alone (copied on writing). Read: pages of read-only mappings (the
    interpreter's code and constants) that were not mapped then and are now. Writable pages
    that were not present then (fresh memory where new objects land) are left out: which of
    them a worker fills depends on the order of its allocations, so they differ between the
    probe and a worker, and a worker that does not need one would hold it for nothing.

    The page map goes into the buffer the zygote mapped before the fork (not among the
    regions), and is scanned in place: large temporaries here would write pages that no
    worker writes.
    """
    assert _buffer is not None
    total = len(_buffer) // 2
    at_start, now = _buffer[:total], _buffer[total:]
    _read_page_map(now)
    runs = array.array("q")
    index = 0
    for start, end, writable in _regions:
        count = (end - start) // _PAGE
        before, after = (_PRESENT, _WRITTEN) if writable else (0, _PRESENT)
        first = -1
        for i in range(count + 1):
            if (
                i < count
                and at_start[index + i] & after == before
                and now[index + i] & after == after
            ):
                if first < 0:
                    first = i
            elif first >= 0:
                runs.extend((start + first * _PAGE, (i - first) * _PAGE, writable))
                first = -1
        index += count
    return runs.tobytes()


def learn_first_call(
    serve: Callable[[socket.socket, Callable[[], None]], int], fork: Callable[[], int]
) -> Runs:
    """The runs a worker's first call touches, learned from a probe (see ``_probe``) with
    ``serve`` as its worker side, forked with ``fork``; none if anything failed (workers then
    just take their page faults)."""
    global _regions, _buffer
    _regions = _private_regions()
    # A mapping of its own, made after the regions were listed: never counted as written.
    # Two page maps: the probe's as it starts, and after its first call.
    entries = sum(end - start for start, end, _ in _regions) // _PAGE * 2
    try:
        address = sc.map_anonymous(entries * 8)
    except OSError:
        return []
    _buffer = memoryview((ctypes.c_uint64 * entries).from_address(address)).cast("B").cast("Q")
    try:
        data = probe_first_call(serve, _before_first_message, touched, fork)
    finally:
        _buffer.release()
        _buffer = None
        _regions = []
        sc.unmap(address, entries * 8)
    flat = array.array("q", data[: len(data) // 24 * 24])
    starts, lengths, writes = flat[::3], flat[1::3], flat[2::3]
    return [(s, n, bool(w)) for s, n, w in zip(starts, lengths, writes, strict=True)]


def populate(runs: Runs) -> None:
    """Copy the pages of ``runs`` into this process now (best effort: a failure only means
    the page faults come later)."""
    for start, length, write in runs:
        with contextlib.suppress(OSError):
            sc.madvise(start, length, sc.MADV_POPULATE_WRITE if write else sc.MADV_POPULATE_READ)
