"""The confinement policy: the seccomp allow-list (generated with libseccomp) and Landlock rules.

The seccomp program is compiled once, in the zygote, and loaded by each worker with one prctl.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Final

__all__ = ["READ_ONLY_PATHS", "compile_seccomp"]

# What a CPython worker with asyncio needs. Everything else fails with EPERM, including ptrace,
# io_uring_*, bpf, unshare, setns, mount, keyctl, perf_event_open, process_vm_*, userfaultfd,
# connect/bind/listen/accept (no socket of any family can reach anything), and fork (clone is
# allowed only to start threads). libseccomp adds the architecture check: i386 and x32 system
# calls kill the process.
_ALLOWED: Final = (  # noqa: SIM905 - a readable block of names
    "read write readv writev pread64 pwrite64 close close_range fstat newfstatat statx lseek "
    "mmap mprotect munmap mremap madvise brk mincore rt_sigaction rt_sigprocmask rt_sigreturn "
    "sigaltstack rt_sigpending rt_sigtimedwait openat getdents64 getcwd readlink readlinkat "
    "faccessat faccessat2 fcntl dup dup3 pipe2 mkdirat unlinkat renameat renameat2 ftruncate "
    "fsync fdatasync utimensat fchmod fchmodat umask recvfrom sendto recvmsg sendmsg shutdown "
    "getsockopt getsockname getpeername epoll_create1 epoll_ctl epoll_wait epoll_pwait "
    "epoll_pwait2 poll ppoll pselect6 eventfd2 timerfd_create timerfd_settime timerfd_gettime "
    "futex set_robust_list get_robust_list rseq set_tid_address membarrier sched_yield "
    "sched_getaffinity getpriority clock_gettime clock_getres gettimeofday nanosleep "
    "clock_nanosleep getrandom getpid gettid getppid getuid geteuid getgid getegid getresuid "
    "getresgid getgroups uname sysinfo prlimit64 getrlimit setrlimit getrusage times exit "
    "exit_group tgkill kill wait4 restart_syscall arch_prctl "
).split()

_CLONE_THREAD: Final = 0x00010000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME: never, not even
# for a thread.
_CLONE_NAMESPACES_ALL: Final = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
)
_IOCTLS: Final = (
    0x5401,
    0x5421,
    0x5450,
    0x5451,
    0x541B,
)  # TCGETS FIONBIO FIONCLEX FIOCLEX FIONREAD


def compile_seccomp() -> bytes:
    """The worker's seccomp filter as classic BPF. Compiled by the host, which hands it to
    the zygote: libseccomp and its Python binding stay out of the zygote's memory."""
    import tempfile

    import pyseccomp as seccomp  # type: ignore[import-untyped]

    f = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    # A binary search over syscall numbers instead of a list: each worker's kernel checks every
    # syscall number against the filter once when it is loaded (to cache the always-allowed
    # ones), and with ~120 rules in a list that took ~0.4 ms per worker.
    f.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    allow = seccomp.ALLOW
    for name in _ALLOWED:
        f.add_rule(allow, name)
    # Threads only: fork and vfork are clone without CLONE_THREAD.
    thread_only = _CLONE_THREAD | _CLONE_NAMESPACES_ALL
    f.add_rule(allow, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, thread_only, _CLONE_THREAD))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone
    for family_call in ("socket", "socketpair"):
        f.add_rule(allow, family_call, seccomp.Arg(0, seccomp.EQ, socket.AF_UNIX))
    for request in _IOCTLS:
        # Compare the low 32 bits only: the kernel ignores the high bits (CVE-2019-10063).
        f.add_rule(allow, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def _interpreter_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    # An editable install or PYTHONPATH entry outside the prefixes (the package's own source).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths.add(os.path.dirname(package_root))
    return sorted(p for p in paths if os.path.isdir(p))


READ_ONLY_PATHS: Final = _interpreter_paths()
"""What a worker may read: the interpreter, its standard library and installed packages."""
