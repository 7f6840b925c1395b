"""Per-worker memory cgroups, where the host can write them (v1 here, v2 elsewhere).

A backstop under ``RLIMIT_AS``: memory the rlimit does not see (or code that keeps allocating
whatever ``MemoryError`` says) meets the kernel's OOM killer inside the worker's own cgroup, and
the host can tell that this is what ended the worker.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from pathlib import Path

__all__ = ["MemoryCgroups", "WorkerCgroup"]

_V1 = Path("/sys/fs/cgroup/memory")
_V2 = Path("/sys/fs/cgroup")
_KEEP = 64
"""Empty cgroups kept for reuse: making and removing a memory cgroup costs the kernel more CPU
than the rest of a worker's start (about 2 ms per worker, measured with v1 here)."""


class WorkerCgroup:
    """One worker's memory cgroup (reused by later workers once its process has exited)."""

    def __init__(self, owner: MemoryCgroups, path: Path) -> None:
        self.path = path
        self._owner = owner
        self._oom_base = 0
        self._limit = -1  # the limit last written
        # Its control files' names, made once: a cgroup serves many workers, and joining
        # pathlib paths for every one of them costs more than the system calls.
        v2 = owner.v2
        self._procs = str(path / "cgroup.procs")
        self._limit_file = str(path / ("memory.max" if v2 else "memory.limit_in_bytes"))
        self._events = str(path / ("memory.events" if v2 else "memory.oom_control"))

    def _oom_kills(self) -> int:
        try:
            for line in _read(self._events).splitlines():
                key, _, value = line.partition(b" ")
                if key == b"oom_kill":
                    return int(value)
        except ValueError:
            pass
        return 0

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer ended a process of this cgroup since the current
        worker was put in it."""
        return self._oom_kills() > self._oom_base

    def release(self) -> None:
        """Give the cgroup back once its process has exited: kept for the next worker, or
        removed (best effort)."""
        self._owner._release(self)


class MemoryCgroups:
    """The host's parent cgroup for its workers, or ``None`` from ``detect`` if unavailable."""

    def __init__(self, root: Path, v2: bool) -> None:
        self.root = root
        self.v2 = v2
        self._free: list[WorkerCgroup] = []
        self._names = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def detect(cls) -> MemoryCgroups | None:
        """A writable memory hierarchy for this host process, or None."""
        name = f"workerloader-{os.getpid()}"
        if (_V1 / "memory.limit_in_bytes").exists():
            root, v2 = _V1 / name, False
        elif b"memory" in _read(_V2 / "cgroup.subtree_control"):
            root, v2 = _V2 / name, True
        else:
            return None
        _remove_abandoned(root.parent)
        try:
            root.mkdir(exist_ok=True)
        except OSError:
            return None
        if v2:
            with contextlib.suppress(OSError):
                _write(root / "cgroup.subtree_control", b"+memory")
        return cls(root, v2)

    def attach(self, pid: int, limit_bytes: int) -> WorkerCgroup | None:
        """Put ``pid`` in a cgroup of its own capped at ``limit_bytes`` (None if that fails)."""
        with self._lock:
            cgroup = self._free.pop() if self._free else None
        if cgroup is None:
            cgroup = WorkerCgroup(self, self.root / f"w{next(self._names)}")
        path = cgroup.path
        try:
            try:
                os.mkdir(path)
            except FileExistsError:  # kept for reuse: set up already
                pass
            else:  # new, or a kept one that someone removed: set up from scratch
                cgroup._limit = -1
                cgroup._oom_base = cgroup._oom_kills()  # a kept one had it read as it emptied
                if self.v2:
                    with contextlib.suppress(OSError):
                        _write(path / "memory.swap.max", b"0")
            if cgroup._limit != limit_bytes:  # a reused cgroup often has it already
                _write(cgroup._limit_file, str(limit_bytes).encode())
                cgroup._limit = limit_bytes
            _write(cgroup._procs, str(pid).encode())
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cgroup

    def _release(self, cgroup: WorkerCgroup) -> None:
        if not _read(cgroup._procs).strip():
            cgroup._oom_base = cgroup._oom_kills()  # final: no process is left to be killed
            with self._lock:
                if len(self._free) < _KEEP:
                    self._free.append(cgroup)
                    return
        with contextlib.suppress(OSError):
            cgroup.path.rmdir()

    def remove(self) -> None:
        """Remove the parent cgroup and the children kept for reuse (after every worker is
        gone)."""
        self._free.clear()
        for child in self.root.glob("w*"):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _remove_abandoned(parent: Path) -> None:
    """Remove the empty cgroups of hosts that died without cleaning up (killed with
    SIGKILL): their ``workerloader-<pid>`` directories would otherwise pile up."""
    for stale in parent.glob("workerloader-*"):
        pid = stale.name.removeprefix("workerloader-")
        if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        for child in stale.glob("w*"):
            with contextlib.suppress(OSError):
                child.rmdir()  # fails, and stays, while a process is still inside
        with contextlib.suppress(OSError):
            stale.rmdir()


# Plain os calls, not pathlib's text files: these run for every worker, and a text file
# object costs more than the system call it wraps.


def _read(path: str | Path) -> bytes:
    """The file's content; b"" if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a control file in one call; OSError if the kernel refuses it."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
