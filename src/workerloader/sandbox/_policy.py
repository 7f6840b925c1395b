"""The confinement policy: the seccomp allow-list (generated with libseccomp) and Landlock rules.

The seccomp programs are compiled by the host (on its interpreter: ``Sandbox.start``) and sent
to the zygote, which loads its own and each worker loads the other with one prctl.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import sysconfig
from typing import Final

__all__ = ["LIBRARY_LINKS", "READ_ONLY_PATHS", "compile_seccomp"]

# What a CPython worker with asyncio needs. Everything else fails with EPERM, including ptrace,
# io_uring_*, bpf, unshare, setns, mount, keyctl, perf_event_open, process_vm_*, userfaultfd,
# connect/bind/listen/accept (no socket of any family can reach anything), and fork (clone is
# allowed only to start threads). libseccomp adds the architecture check: i386 and x32 system
# calls kill the process (all its threads).
_ALLOWED: Final = (  # noqa: SIM905 - a readable block of names
    "read write readv writev pread64 pwrite64 close close_range fstat newfstatat statx lseek "
    "mmap mprotect munmap mremap madvise brk mincore rt_sigaction rt_sigprocmask rt_sigreturn "
    "sigaltstack rt_sigpending rt_sigtimedwait openat getdents64 getcwd readlink readlinkat "
    "faccessat faccessat2 fcntl dup dup3 pipe2 mkdirat unlinkat renameat renameat2 ftruncate "
    # The older calls glibc still makes on x86_64 for os.mkdir, os.remove, os.rename, ...:
    # Landlock keeps them to the scratch directory like their *at forms.
    "mkdir rmdir unlink rename link linkat symlink symlinkat access truncate chmod statfs "
    "fstatfs "
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


_ZYGOTE_EXTRA: Final = (  # noqa: SIM905
    "mount pidfd_open setresuid setresgid prctl dup2 memfd_create "
    "landlock_create_ruleset landlock_add_rule landlock_restrict_self"
).split()
"""What the zygote, and a worker until it has confined itself, needs beyond a worker's list
(plus unshare/setns of PID and mount namespaces, and fork)."""
_CLONE_NEWNS: Final = 0x00020000
_CLONE_NEWPID: Final = 0x20000000


def compile_seccomp() -> tuple[bytes, bytes]:
    """The seccomp filters as classic BPF: the zygote's, then the one each worker stacks on it.

    Together they allow exactly the worker's list above. The zygote's filter is that list plus
    what forking and confining a worker takes (``_ZYGOTE_EXTRA``, forks, PID and mount
    namespaces); every worker inherits it, already loaded. The worker's own filter only takes
    those extras away again: it is a few rules, cheap for each worker to load (the kernel
    checks every syscall number against a new filter, which for the whole list took ~0.3 ms
    per worker). Compiled by the host: libseccomp stays out of the zygote.
    """
    import pyseccomp as seccomp  # type: ignore[import-untyped]

    allow, deny = seccomp.ALLOW, seccomp.ERRNO(errno.EPERM)
    zygote = seccomp.SyscallFilter(deny)
    # A binary search over syscall numbers instead of a list of ~120 comparisons.
    zygote.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    # A call of another architecture (i386's int 0x80, x32) ends the process, not only the
    # thread that made it (libseccomp's default): a worker's other threads would live on.
    zygote.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in (*_ALLOWED, *_ZYGOTE_EXTRA):
        zygote.add_rule(allow, name)
    # Threads and forks, never with a namespace flag.
    zygote.add_rule(allow, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_NAMESPACES_ALL, 0))
    zygote.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone
    own_namespaces = ~(_CLONE_NEWPID | _CLONE_NEWNS) & 0xFFFFFFFF
    zygote.add_rule(allow, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, own_namespaces, 0))
    zygote.add_rule(allow, "setns", seccomp.Arg(1, seccomp.EQ, _CLONE_NEWPID))
    for family_call in ("socket", "socketpair"):
        zygote.add_rule(allow, family_call, seccomp.Arg(0, seccomp.EQ, socket.AF_UNIX))
    for request in _IOCTLS:
        # Compare the low 32 bits only: the kernel ignores the high bits (CVE-2019-10063).
        zygote.add_rule(allow, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))

    worker = seccomp.SyscallFilter(allow)  # what the zygote's filter denies stays denied
    worker.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in (*_ZYGOTE_EXTRA, "unshare", "setns"):
        worker.add_rule(deny, name)
    # Datagrams only to a connected peer: an address would name a socket in the file system
    # (where the worker's view of it holds none, this is a second wall).
    worker.add_rule(deny, "sendto", seccomp.Arg(4, seccomp.NE, 0))
    # Threads only: fork and vfork are clone without CLONE_THREAD.
    worker.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    return _bpf(zygote), _bpf(worker)


def _bpf(filter_: object) -> bytes:
    import tempfile

    with tempfile.TemporaryFile() as out:
        filter_.export_bpf(out)  # type: ignore[attr-defined]
        out.seek(0)
        return out.read()


def _interpreter_paths() -> list[str]:
    # By the names Python uses (sys.path, .pth files): a worker's file system holds them there.
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    # An editable install or PYTHONPATH entry outside the prefixes (the package's own source).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths.add(os.path.dirname(package_root))
    # The system's shared libraries, which extension modules link (zlib's libz, sqlite3's
    # libsqlite3, ssl's libssl, pydantic-core's libgcc_s): without them `import zlib` fails.
    # By their real names: /lib and /lib64 are links to them on most systems (LIBRARY_LINKS).
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for libs in ("/usr/lib", "/lib"):
        libs = os.path.join(libs, multiarch) if multiarch else libs
        paths.add(os.path.realpath(libs))
    paths.update(os.path.realpath(p) for p in ("/usr/lib64", "/lib64"))
    found = {os.path.abspath(p) for p in paths if os.path.isdir(p)}
    # An entry inside another adds nothing (a rule, or a mount, of the outer one holds it).
    return sorted(p for p in found if not any(p.startswith(q + "/") for q in found))


READ_ONLY_PATHS: Final = _interpreter_paths()
"""What a worker may read: the interpreter, its standard library and installed packages, and
the system's shared libraries they link."""

LIBRARY_LINKS: Final = tuple(p for p in ("/lib", "/lib64") if os.path.islink(p))
"""Top-level symbolic links to library directories (a merged /usr), kept in a worker's file
system: the dynamic loader looks in /lib/<multiarch> too."""
