"""Per-worker memory cgroups, where the host can write them (v1 here, v2 elsewhere).

A backstop under ``RLIMIT_AS``: memory the rlimit does not see (or code that keeps allocating
whatever ``MemoryError`` says) meets the kernel's OOM killer inside the worker's own cgroup, and
the host can tell that this is what ended the worker.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["MemoryCgroups", "WorkerCgroup"]

_V1 = Path("/sys/fs/cgroup/memory")
_V2 = Path("/sys/fs/cgroup")


class WorkerCgroup:
    """One worker's memory cgroup."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path = path
        self._v2 = v2

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer ended a process of this cgroup."""
        name = "memory.events" if self._v2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        """Remove the cgroup once its process has exited (best effort)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()


class MemoryCgroups:
    """The host's parent cgroup for its workers, or ``None`` from ``detect`` if unavailable."""

    def __init__(self, root: Path, v2: bool) -> None:
        self.root = root
        self._v2 = v2

    @classmethod
    def detect(cls) -> MemoryCgroups | None:
        """A writable memory hierarchy for this host process, or None."""
        name = f"workerloader-{os.getpid()}"
        if (_V1 / "memory.limit_in_bytes").exists():
            root, v2 = _V1 / name, False
        elif "memory" in _read(_V2 / "cgroup.subtree_control"):
            root, v2 = _V2 / name, True
        else:
            return None
        try:
            root.mkdir(exist_ok=True)
        except OSError:
            return None
        if v2:
            with contextlib.suppress(OSError):
                (root / "cgroup.subtree_control").write_text("+memory")
        return cls(root, v2)

    def attach(self, pid: int, limit_bytes: int) -> WorkerCgroup | None:
        """Put ``pid`` in a new cgroup capped at ``limit_bytes`` (None if that fails)."""
        path = self.root / f"w{pid}"
        try:
            path.mkdir()
            limit_file = "memory.max" if self._v2 else "memory.limit_in_bytes"
            (path / limit_file).write_text(str(limit_bytes))
            if self._v2:
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
            (path / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return WorkerCgroup(path, self._v2)

    def remove(self) -> None:
        """Remove the parent cgroup (after every worker is gone)."""
        for child in self.root.glob("w*"):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
