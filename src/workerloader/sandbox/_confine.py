"""What a freshly forked worker does to itself before any tenant code runs.

Order matters: mounts need the namespace-root identity, so they come before dropping to the
worker's own uid; Landlock and seccomp come last, once nothing else needs the calls they deny.
"""

from __future__ import annotations

import os
import resource
import signal

from . import _syscalls as sc
from ._policy import READ_ONLY_PATHS

__all__ = ["SCRATCH", "UNDER_SCRATCH", "close_inherited", "confine"]

SCRATCH = "/tmp"
"""The worker's private, size-capped scratch directory (a tmpfs of its own)."""

UNDER_SCRATCH = [
    (path, f"/.under-scratch/{i}")
    for i, path in enumerate(p for p in READ_ONLY_PATHS if (p + "/").startswith(SCRATCH + "/"))
]
"""Interpreter paths under the scratch directory (a checkout in /tmp), each with a second
place the zygote binds it at: a worker's scratch hides the first, and it binds the second
back there."""
_FS_READ = sc.LANDLOCK_READ_FILE | sc.LANDLOCK_READ_DIR | sc.LANDLOCK_EXECUTE
_FS_DEVNULL = sc.LANDLOCK_READ_FILE | sc.LANDLOCK_WRITE_FILE
_FS_ALL = sc.landlock_fs_rights()  # what this kernel's Landlock can restrict (asked once)


def _landlock_ruleset() -> int:
    """The worker's file-system rules as a Landlock ruleset fd: read the interpreter, read
    and write the scratch directory, nothing else. Built after the scratch tmpfs is mounted:
    a rule on the directory underneath a mount point does not reach into the mount."""
    rules = [(path, _FS_READ) for path in READ_ONLY_PATHS]
    rules += [("/dev/null", _FS_DEVNULL), (SCRATCH, _FS_ALL)]
    return sc.landlock_ruleset(_FS_ALL, rules)


def close_inherited(channel_fd: int) -> None:
    """Close every fd but the channel; point stdio at /dev/null."""
    os.closerange(3, channel_fd)
    os.closerange(channel_fd + 1, 1 << 16)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def confine(channel_fd: int, uid: int, seccomp_bpf: bytes, scratch_mb: int) -> None:
    """Confine the calling process, which must be pid 1 of its own PID namespace inside the
    zygote's user, network, IPC and UTS namespaces (whose environment is already empty).
    Raises OSError if any step fails (the caller then exits: a worker that is not fully
    confined never runs). Each step is a system call or a few: the seccomp program was
    compiled once by the host, and the zygote's own filter is already in place (inherited)."""
    # 1. Only the RPC channel survives; stdio goes to /dev/null (logs are captured in Python).
    close_inherited(channel_fd)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    # 2. A private mount namespace (of the zygote's root, see _zygote._enter_worker_root: its
    # /proc already covered) with a size-capped tmpfs as scratch.
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(
        "tmpfs",
        SCRATCH,
        "tmpfs",
        sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
        f"size={scratch_mb}m,nr_inodes=4096,mode=0777",
    )
    # The interpreter may live under the scratch path (a checkout in /tmp): keep it visible.
    for path, staged in UNDER_SCRATCH:
        os.makedirs(path, exist_ok=True)
        sc.bind_read_only(staged, path)
    # 3. The worker's own identity: no two workers share a uid.
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # 4. Hard limits that hold whatever the tenant does (per-worker limits lower them later).
    for limit, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_FSIZE, scratch_mb << 20),
        (resource.RLIMIT_NPROC, 64),
    ):
        resource.setrlimit(limit, (value, value))
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    # 5. Filesystem: read the interpreter, read and write the scratch, nothing else.
    ruleset = _landlock_ruleset()
    sc.landlock_restrict_self(ruleset)
    os.close(ruleset)
    # 6. System calls: stacked on the zygote's filter, this leaves exactly the worker's list.
    sc.load_seccomp_bpf(seccomp_bpf)
