"""A worker's output, shared with the host as it is written.

A call's output comes back in its answer; a call that a limit ends (a kill from outside) gives
none. So the worker also copies what its latest call writes into a small shared memory file
the zygote made for it (a memfd, sealed at its size, whose descriptor the worker closes before
any tenant code runs: it keeps only the mapping). The host keeps a descriptor of the same file
and reads it once the worker is gone. It treats the content as hostile: a length it clamps and
text it decodes with replacement.

Layout: a little-endian u32 of the bytes written, then the bytes (the first ``SIZE - 4``).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

__all__ = ["SIZE", "OutputWriter", "new_output_file", "read_output"]

SIZE = 64 * 1024
_LENGTH = struct.Struct("<I")
_CAPACITY = SIZE - _LENGTH.size


def new_output_file() -> int:
    """A new memfd of ``SIZE`` bytes that can neither grow nor shrink (the worker maps it, and
    a mapping past a shrunk file's end would fault)."""
    fd = os.memfd_create("workerloader-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, SIZE)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


class OutputWriter:
    """The worker's side: ``reset`` as a call starts, ``write`` what it prints."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE)
        self._length = 0

    def reset(self) -> None:
        self._length = 0
        _LENGTH.pack_into(self._map, 0, 0)

    def write(self, text: str) -> None:
        room = _CAPACITY - self._length
        if room <= 0:
            return
        data = text.encode("utf-8", "replace")[:room]
        start = _LENGTH.size + self._length
        self._map[start : start + len(data)] = data
        self._length += len(data)
        _LENGTH.pack_into(self._map, 0, self._length)  # after the bytes it counts


def read_output(fd: int) -> list[str]:
    """The host's side: the lines the worker's latest call wrote to the output file ``fd``, as
    far as they fit.

    Read, not mapped: a host takes a worker every cold start and reads its output only when a
    limit ended a call, and a mapping made and unmade for each worker cost the service's loop
    more than the read (mapping changes take the address space's lock, which the service's
    other threads contend for, and unmapping flushes the other CPU's TLB)."""
    data = os.pread(fd, SIZE, 0)
    if len(data) < _LENGTH.size:  # the file is sealed at its size: never, but not a crash
        return []
    (length,) = _LENGTH.unpack_from(data, 0)
    return (
        data[_LENGTH.size : _LENGTH.size + min(length, _CAPACITY)]
        .decode("utf-8", "replace")
        .splitlines()
    )
