"""Thin ctypes wrappers for the Linux calls Python 3.11 does not expose (unshare, setns, mount,
pivot_root, prctl, seccomp filter load, Landlock, madvise, anonymous mmap). Each raises OSError
with errno on failure."""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "bind_read_only",
    "landlock_abi_version",
    "landlock_fs_rights",
    "landlock_restrict_self",
    "landlock_ruleset",
    "load_seccomp_bpf",
    "madvise",
    "map_anonymous",
    "mount",
    "pivot_root",
    "prctl",
    "setns",
    "unmap",
    "unshare",
]

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_SET_NO_NEW_PRIVS: Final = 38
PR_SET_CHILD_SUBREAPER: Final = 36
PR_SET_SECCOMP: Final = 22
SECCOMP_MODE_FILTER: Final = 2

MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _check(result: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype))


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        )
    )


_SYS_PIVOT_ROOT: Final = 155  # x86_64; glibc has no wrapper


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()))


def bind_read_only(source: str, target: str) -> None:
    """Bind ``source`` (and what is mounted under it) at ``target``, read-only, with no
    setuid or device files."""
    mount(source, target, None, MS_BIND | MS_REC, None)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    mount("none", target, None, flags, None)


def umount(target: str) -> None:
    """Lazily detach the mount at ``target`` and everything under it (MNT_DETACH)."""
    _check(_libc.umount2(target.encode(), MNT_DETACH))


MADV_POPULATE_READ: Final = 22  # Linux 5.14+; older kernels answer EINVAL
MADV_POPULATE_WRITE: Final = 23
MADV_COLLAPSE: Final = 25  # Linux 6.1+
_PROT_READ_WRITE: Final = 0x1 | 0x2
_MAP_PRIVATE_ANONYMOUS: Final = 0x02 | 0x20
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def madvise(address: int, length: int, advice: int) -> None:
    _check(_libc.madvise(address, length, advice))


def map_anonymous(length: int) -> int:
    """The address of ``length`` bytes of fresh private memory, a mapping of its own."""
    address = _libc.mmap(None, length, _PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS, -1, 0)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(address)


def unmap(address: int, length: int) -> None:
    _check(_libc.munmap(address, length))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp_bpf(program: bytes) -> None:
    """Install a precompiled classic-BPF seccomp filter (8 bytes per instruction) on this
    thread; needs no_new_privs set first."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0))


# Landlock has no libc wrappers here; its system call numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET: Final = 444
_SYS_LANDLOCK_ADD_RULE: Final = 445
_SYS_LANDLOCK_RESTRICT_SELF: Final = 446
_PATH_BENEATH: Final = 1  # LANDLOCK_RULE_PATH_BENEATH


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


LANDLOCK_READ_FILE: Final = 1 << 2
LANDLOCK_WRITE_FILE: Final = 1 << 1
LANDLOCK_READ_DIR: Final = 1 << 3
LANDLOCK_EXECUTE: Final = 1 << 0
_LANDLOCK_CREATE_RULESET_VERSION: Final = 1
# The file-system rights each Landlock ABI version added: v1 thirteen, v2 REFER, v3 TRUNCATE,
# v5 IOCTL_DEV (v4 added network rights only).
_LANDLOCK_FS_BY_ABI: Final = ((1, 0x1FFF), (2, 1 << 13), (3, 1 << 14), (5, 1 << 15))


def landlock_abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    version = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def landlock_fs_rights() -> int:
    """Every file-system right this kernel's Landlock can restrict."""
    abi = landlock_abi_version()
    rights = 0
    for since, added in _LANDLOCK_FS_BY_ABI:
        if abi >= since:
            rights |= added
    return rights


def landlock_ruleset(handled: int, rules: list[tuple[str, int]]) -> int:
    """A Landlock ruleset fd handling the ``handled`` file-system accesses and allowing, for
    each ``(path, access)``, that access beneath ``path``. Building it restricts nobody: the
    caller applies it with ``landlock_restrict_self``."""
    attr = _RulesetAttr(handled)
    size = ctypes.c_size_t(ctypes.sizeof(attr))
    fd = _check(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0))
    try:
        for path, access in rules:
            path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.byref(_PathBeneathAttr(access & handled, path_fd))
                _check(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, fd, _PATH_BENEATH, rule, 0))
            finally:
                os.close(path_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def landlock_restrict_self(ruleset_fd: int) -> None:
    """Enforce a ruleset on the calling thread (and what it forks); needs no_new_privs."""
    _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0))
