"""The host's side of the sandbox: start the zygote, ask it for workers, kill them."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .._errors import SandboxUnavailable, WorkerloaderError
from . import _syscalls
from ._cgroup import MemoryCgroups, WorkerCgroup
from ._chores import Chores
from ._identity import code_digest
from ._output import read_output
from ._policy import compile_seccomp

__all__ = ["Sandbox", "WorkerProcess", "sandbox_support"]

_UID_BASE = 100_000  # host uid of uid 0 inside the zygote's user namespace
_UID_RANGE = 65_536


_BACKGROUND_NICE = 10
"""How many nice levels the zygote and its pooled workers run below the host (see ``spawn``)."""


def sandbox_support() -> str | None:
    """None if this machine can run the sandbox, else why not."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux namespaces and seccomp; this is {sys.platform}"
    if os.geteuid() != 0:
        return "the sandbox must start as root to map its workers' user ids"
    for path in ("/proc/self/ns/user", "/proc/self/ns/pid", "/proc/self/ns/net"):
        if not os.path.exists(path):
            return f"namespaces are missing ({path})"
    try:
        import pyseccomp  # type: ignore[import-untyped]  # noqa: F401
    except Exception as exc:  # libseccomp missing
        return f"seccomp is unavailable: {exc}"
    if _syscalls.landlock_abi_version() < 1:
        return "Landlock is not enabled in this kernel"
    return None


def raise_open_files_limit() -> None:
    """Lift this process's soft limit on open files to its hard one. Each live worker holds
    a few of the host's descriptors (its channel, pidfd, output file, cgroup); at the common
    soft default of 1,024 a host ran out at 337 live workers (measured) while the hard
    limit, often 500,000 or more, allowed far more. asyncio's epoll has no FD_SETSIZE
    ceiling."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # "unlimited" is not a value the kernel takes for a soft limit
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class WorkerProcess:
    """One sandboxed worker process: its RPC channel, a pidfd to signal it, and its memory
    cgroup where the host can make one."""

    channel: socket.socket
    pidfd: int
    pid: int
    output: int | None = None
    """The file of what the worker's latest call wrote, as it wrote it (``_output``): read it
    with ``output_lines`` once a limit has ended the call."""
    cgroup: WorkerCgroup | None = None
    """Set by the cgroup thread once the worker is in its cgroup."""
    _chores: Chores | None = None  # the sandbox's thread for this worker's slow calls
    _limited = False  # limit_memory has queued the cgroup attach
    _exited: asyncio.Future[None] | None = None

    @property
    def _cpu_clock(self) -> int:
        # The process-wide CPU-time clock of a pid (the kernel's CPUCLOCK_SCHED encoding, as
        # glibc's clock_getcpuclockid makes it). Another process's per-thread clocks cannot be
        # read (EINVAL).
        return ((~self.pid) << 3) | 2

    def output_lines(self) -> list[str]:
        """The lines the worker's latest call wrote, as far as its output file holds them."""
        return [] if self.output is None else read_output(self.output)

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer ended the worker inside its memory cgroup."""
        return self.cgroup is not None and self.cgroup.oom_killed()

    async def wait_exit(self, within_s: float = 1.0) -> None:
        """Wait (up to ``within_s``) until the process has exited; its pidfd turns readable.
        Any number of callers may wait at once."""
        if self.pidfd < 0:
            return
        if self._exited is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()
            pidfd = self.pidfd

            def on_exit() -> None:  # level-triggered: may run again before remove_reader
                loop.remove_reader(pidfd)
                if not exited.done():
                    exited.set_result(None)

            try:
                loop.add_reader(pidfd, on_exit)
            except (OSError, ValueError):
                return
            self._exited = exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), within_s)

    def kill(self) -> None:
        """SIGKILL the worker (its whole PID namespace goes with it); safe if already dead."""
        _kill(self.pidfd)

    def cpu_ns(self) -> int:
        """CPU time the worker's process (all its threads) has used, in nanoseconds; 0 once it
        is gone (reaped). Read from the process's CPU-time clock: one system call (~1 µs,
        against ~7 µs to read ``/proc``). Like ``/proc``'s figures, it counts a thread that is
        running on another CPU only as of its last switch or scheduler tick: a lower bound that
        lags by at most a tick, exact for a worker that waits."""
        try:
            return time.clock_gettime_ns(self._cpu_clock)
        except OSError:
            return 0

    async def stop(self) -> None:
        """Kill the worker (on the sandbox's chores thread) at the lowest priority
        (``_wind_down``) and wait for it to exit; its channel stays open. Safe twice."""
        if self.pidfd < 0 or (self._exited is not None and self._exited.done()):
            return
        if self._chores is None:
            _wind_down(self.pid, self.pidfd)
        else:
            self._chores.submit(functools.partial(_wind_down, self.pid, self.pidfd))
        await self.wait_exit()

    async def aclose(self) -> None:
        """Kill the worker, wait for it to exit, release its fds and cgroup. Safe twice.

        The kill, the pidfd's close and the cgroup's release run on the sandbox's chores
        thread, in that order; the pidfd is closed there only after every use here is over."""
        if self.pidfd < 0:
            return
        chores = self._chores
        pidfd = self.pidfd
        try:
            await self.stop()
        finally:  # cancelled while it waited, too: nothing is left open
            if self._exited is not None and not self._exited.done():
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(pidfd)
                self._exited.cancel()
            self.channel.close()
            if self.output is not None:
                os.close(self.output)  # here, not on the chores thread: reads happen on this one
                self.output = None
            self.pidfd = -1  # later kill() calls do nothing
            if chores is None:
                self._release(pidfd)
            else:
                chores.submit(functools.partial(self._release, pidfd))

    def _release(self, pidfd: int) -> None:
        # Still running (it did not exit in time, its teardown starved at the lowest priority
        # by busy workers): it finishes at the host's priority, and is killed should it not
        # have been yet. Never leave one behind.
        _renice_if_alive(self.pid, pidfd, os.getpriority(os.PRIO_PROCESS, 0))
        _kill(pidfd)
        with contextlib.suppress(OSError):
            os.close(pidfd)
        if self.cgroup is not None:
            self.cgroup.release()


_DYING_NICE = 19
"""The priority a worker is stopped at: the lowest. Its exit tears down the address space it
shares with the zygote (~0.8 ms of CPU, the largest part of a cold start's cost after the call
itself) and nobody waits for it; at the host's priority it took the CPU from the calls in
flight. Cold ``POST /execute`` on two cores, alternating two services (nice 0 / nice 19 here):
p50 from one client lower in 11 of 12 rounds (medians 3.05 / 2.52 ms), new executions/s on four
connections higher in 10 of 12 (290 / 309); in a faster phase of the machine, within noise."""


def _wind_down(pid: int, pidfd: int) -> None:
    """Lower a live worker's priority to ``_DYING_NICE``, then SIGKILL it."""
    _renice_if_alive(pid, pidfd, _DYING_NICE)
    _kill(pidfd)


def _renice_if_alive(pid: int, pidfd: int, nice: int) -> None:
    """Set every thread of the worker ``pid`` to ``nice`` if it has not exited (best effort:
    not if it is gone meanwhile, or not ours to change)."""
    # The pid names the worker only while it lives (it is reused only once the process has
    # exited and been reaped): its pidfd turns readable when it exits.
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    if pid <= 0 or poll.poll(0):
        return
    # Linux keeps a priority per thread, and whichever thread exits last tears the address
    # space down: each of a worker's threads (most have one) is set.
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def _kill(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _out_of_descriptors() -> WorkerloaderError:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return WorkerloaderError(
        f"this process is out of file descriptors (RLIMIT_NOFILE {soft}): each live "
        "worker holds a few; raise the limit (ulimit -n) or lower max_workers"
    )


def _pid_of(pidfd: int) -> int:
    """The host pid behind a pidfd (its fdinfo; read raw: a text file object costs more than
    the read, once per worker)."""
    fd = os.open(f"/proc/self/fdinfo/{pidfd}", os.O_RDONLY)
    try:
        info = os.read(fd, 4096)
    finally:
        os.close(fd)
    for line in info.splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    raise OSError("no pid for pidfd")


def _write_id_maps(pid: int) -> None:
    """Map uid/gid 0..65535 in the zygote's user namespace to unprivileged host ids (procfs
    writes, which do not block)."""
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {_UID_BASE} {_UID_RANGE}")


_START_TIMEOUT_S = 60.0
"""How long the zygote may take to start (~1 s; more on a loaded machine)."""


def _resolve(python: str) -> str:
    """``python`` as an absolute path: the zygote starts with no PATH of the caller's and in
    ``/``, where a relative path or a bare name would find nothing (unchanged if it is
    nowhere: starting it then says so)."""
    found = shutil.which(os.path.expanduser(python))
    return os.path.abspath(found) if found else python


class Sandbox:
    """The zygote process and the workers it forks. Use ``async with`` or ``start``/``aclose``."""

    def __init__(
        self,
        *,
        pool_size: int = 8,
        scratch_mb: int = 16,
        insecure: bool = False,
        python: str | None = None,
    ):
        """``python``: the interpreter the zygote, and so every worker, runs (default: the
        host's own). It must import the same workerloader version as the host (``start``
        checks); on Python 3.12+ workers share most of the zygote's memory (immortal
        objects), so the host may run on a faster build of another version (a distribution's
        optimized 3.11, say) while workers run on 3.12."""
        self.python = _resolve(python) if python else sys.executable
        self.insecure = False
        """True once started without confinement (only when asked to and the sandbox is
        unavailable)."""
        self._allow_insecure = insecure
        self._pool_size = pool_size
        self._scratch_mb = scratch_mb
        self._ctrl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = asyncio.Lock()
        self._cgroups: MemoryCgroups | None = None
        self._chores = Chores()

    async def start(self) -> None:
        """Start the zygote and wait until its pool is warm."""
        raise_open_files_limit()
        reason = sandbox_support()
        if reason is not None:
            if not self._allow_insecure:
                raise SandboxUnavailable(
                    f"{reason}; workers would run unconfined. Fix the machine, or pass "
                    "insecure=True (--insecure) to run them anyway."
                )
            self.insecure = True
        host, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            "PATH": "/usr/bin:/bin",
            # The C allocator, not pymalloc. A worker's new objects then land one after
            # another at the top of one heap, not in a fresh pool of each size class across
            # 1 MB arenas, and that heap can be put in huge pages (_hugepages).
            "PYTHONMALLOC": "malloc",
            "WORKERLOADER_POOL": str(self._pool_size),
            "WORKERLOADER_SCRATCH_MB": str(self._scratch_mb),
            "WORKERLOADER_INSECURE": "1" if self.insecure else "0",
            # Only a host that may raise a worker's priority again (root) lowers the zygote's.
            "WORKERLOADER_NICE": str(_BACKGROUND_NICE if os.geteuid() == 0 else 0),
        }
        try:
            self._proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; long-lived
                # -I is -E -s -P; without its -E, Python reads the environment above (made
                # here, whole), and obeys every PYTHON* variable put into it.
                [
                    self.python,
                    "-s",
                    "-P",
                    "-m",
                    "workerloader.sandbox._zygote",
                    str(zygote.fileno()),
                ],
                pass_fds=[zygote.fileno()],
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError as exc:
            host.close()
            raise SandboxUnavailable(f"cannot run the sandbox's interpreter: {exc}") from None
        finally:
            zygote.close()
        self._ctrl = host
        host.setblocking(False)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await self._handshake(host)
        except BaseException as exc:  # every way out stops the zygote
            await self.aclose()
            if isinstance(exc, TimeoutError):
                raise SandboxUnavailable(
                    f"the zygote ({self.python}) did not start within {_START_TIMEOUT_S:g} s"
                ) from None
            raise

    async def _handshake(self, host: socket.socket) -> None:
        """The zygote's start (see ``_zygote``), up to its ``ready``."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        first = await loop.sock_recv(host, 16)
        if first == b"":
            raise SandboxUnavailable(
                "the zygote exited as it started (its error is on stderr): its namespaces "
                f"could not be made, or its interpreter {self.python} lacks workerloader"
            )
        if first != b"userns":
            raise SandboxUnavailable("the zygote could not create its namespaces")
        if not self.insecure:
            _write_id_maps(self._proc.pid)
        await loop.sock_sendall(host, b"mapped")
        # The seccomp programs, compiled here: the zygote's, then each worker's (a datagram each).
        for program in [b"unconfined"] * 2 if self.insecure else compile_seccomp():
            await loop.sock_sendall(host, program)
        if not self.insecure:
            self._cgroups = MemoryCgroups.detect()
        ready = await loop.sock_recv(host, 256)
        if ready == b"ready":
            raise SandboxUnavailable(
                f"the sandbox's interpreter {self.python} imports an older workerloader than "
                f"this host's {__version__}: install this one for it"
            )
        if not ready.startswith(b"ready "):
            raise SandboxUnavailable("the zygote failed to start")
        version, _, code = ready.removeprefix(b"ready ").decode(errors="replace").partition(" ")
        here = Path(__file__).parents[1]
        if version != __version__:
            raise SandboxUnavailable(
                f"the sandbox's interpreter {self.python} imports workerloader {version}; this "
                f"host runs {__version__} (from {here}): install that one for it"
            )
        if code != code_digest():
            raise SandboxUnavailable(
                f"the sandbox's interpreter {self.python} imports workerloader {version} from "
                f"other sources than this host's ({here}): install this one for it"
            )

    async def spawn(self) -> WorkerProcess:
        """A new confined worker, waiting for its code on its channel (``limit_memory`` puts
        it in a memory cgroup)."""
        ctrl = self._ctrl
        if ctrl is None:
            raise SandboxUnavailable("the sandbox is not running")
        loop = asyncio.get_running_loop()
        async with self._lock:
            await loop.sock_sendall(ctrl, b"spawn")
            fds = array.array("i")
            while True:
                try:
                    # Close-on-exec: a program the embedding app runs must not inherit them.
                    msg, ancdata, _, _ = ctrl.recvmsg(
                        16, socket.CMSG_LEN(3 * fds.itemsize), socket.MSG_CMSG_CLOEXEC
                    )
                    break
                except BlockingIOError:
                    waiter: asyncio.Future[None] = loop.create_future()

                    def readable(waiter: asyncio.Future[None] = waiter) -> None:
                        if not waiter.done():  # may fire again, or after a cancellation
                            waiter.set_result(None)

                    # By number: the selector's lookup of a socket object formats its repr
                    # (several system calls) whenever it is not registered yet.
                    loop.add_reader(ctrl.fileno(), readable)
                    try:
                        await waiter
                    finally:
                        loop.remove_reader(ctrl.fileno())
        if not msg:
            raise SandboxUnavailable("the zygote has exited")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(fds) != 3:  # the kernel drops passed descriptors this process has no room for
            for fd in fds:
                os.close(fd)
            raise _out_of_descriptors()
        channel_fd, pidfd, output_fd = fds[0], fds[1], fds[2]
        try:
            pid = _pid_of(pidfd)  # opens a file
        except OSError as exc:
            os.close(channel_fd)  # the worker sees its channel end, and exits
            os.close(pidfd)
            os.close(output_fd)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors() from None
            raise
        process = WorkerProcess(socket.socket(fileno=channel_fd), pidfd, pid, output_fd)
        process._chores = self._chores
        # The zygote, and so every pooled worker, runs 10 nice levels below the host: forking
        # and starting workers in the background then yields to the calls in flight. A worker
        # handed out gets the host's own priority back. Measured in five runs, each alternating
        # the zygote at 10 and at 0: new workers/s higher at 10 in four of them (by 1-14%),
        # cold call p50 lower in four (by 0.02-0.34 ms); a small gain, within this machine's
        # noise in single runs.
        with contextlib.suppress(OSError):  # gone already, or not ours to raise (not root)
            os.setpriority(os.PRIO_PROCESS, process.pid, os.getpriority(os.PRIO_PROCESS, 0))
        return process

    def limit_memory(self, process: WorkerProcess, limit_bytes: int) -> None:
        """Put the worker in a memory cgroup of its own capped at ``limit_bytes``, where
        cgroups are writable. Once per worker, as its code is sent: the move is made by the
        chores thread, soon after (memory charged before it stays with the host's cgroup;
        RLIMIT_AS and the scratch size cap hold meanwhile)."""
        cgroups = self._cgroups
        if cgroups is None or process._limited:
            return
        process._limited = True

        def attach() -> None:
            process.cgroup = cgroups.attach(process.pid, limit_bytes)

        # On the chores thread: the write can block; RLIMIT_AS covers the worker meanwhile.
        self._chores.submit(attach)

    async def aclose(self) -> None:
        """Stop the zygote; every worker dies with it. Safe to call twice."""
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 5)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._chores.close()  # every worker's release has run
        if self._cgroups is not None:
            self._cgroups.remove()
            self._cgroups = None
