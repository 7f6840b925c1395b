"""The zygote: a clean-exec'd, confined process that forks pre-confined workers.

Started by the host as ``python -s -P -m workerloader.sandbox._zygote FD`` with an
environment of its own making (``PYTHONMALLOC=malloc``: see ``_hugepages``). It unshares
user, network, IPC, UTS, mount and PID namespaces, waits for the host to write its uid/gid
maps, then forks the zygote proper (pid 1 of the new PID namespace). That
process imports the worker runtime once and keeps a pool of pre-forked workers, each pid 1 of
its own PID namespace, already confined and waiting on its RPC channel.

Control protocol (SOCK_SEQPACKET, one message per datagram):

- zygote → host ``b"userns"``; host writes the maps and answers ``b"mapped"``;
- zygote → host ``b"ready <version> <digest>"`` once the pool is warm: the version and
  ``_identity.code_digest`` of the workerloader it imported, which the host checks against
  its own;
- host → zygote ``b"spawn"``; zygote → host ``b"worker"`` with three fds (SCM_RIGHTS): the
  host's end of the worker's channel, a pidfd of the worker, and its output file (``_output``);
- the host closing the socket stops the zygote; its workers die with it (PDEATHSIG).
"""

from __future__ import annotations

import array
import gc
import os
import select
import signal
import socket
import sys
import traceback
from collections import deque
from collections.abc import Callable

# asyncio imports ssl only for TLS transports, which a worker without a network never uses.
# Keeping OpenSSL out of the zygote saves three libraries (15 mappings) that every fork copies
# and every exit tears down; tenant code that imports ssl still can (it is loaded then).
sys.modules["ssl"] = None  # type: ignore[assignment]
import asyncio  # noqa: E402, F401 - imported here, while ssl is hidden

del sys.modules["ssl"]

from .. import __version__  # noqa: E402
from . import _syscalls as sc  # noqa: E402
from ._confine import close_inherited, confine  # noqa: E402
from ._fill import fill_free_blocks  # noqa: E402
from ._fork import fork, single_threaded  # noqa: E402
from ._hugepages import collapse_heap  # noqa: E402
from ._identity import code_digest  # noqa: E402
from ._immortal import immortalize_heap  # noqa: E402
from ._output import new_output_file  # noqa: E402
from ._pack import pack_hot_code  # noqa: E402
from ._prefault import Runs, learn_first_call, populate  # noqa: E402
from ._uids import next_free_uid  # noqa: E402

POOL_SIZE = int(os.environ.get("WORKERLOADER_POOL", "8"))
INSECURE = os.environ.get("WORKERLOADER_INSECURE") == "1"
"""Run workers unconfined: only where the host found no sandbox and was told to go on."""
SCRATCH_MB = int(os.environ.get("WORKERLOADER_SCRATCH_MB", "16"))
NICE = int(os.environ.get("WORKERLOADER_NICE", "0"))
"""How many nice levels the zygote and its pooled workers run below the host, which gives a
worker the host's own priority as it hands it out."""
os.environ.clear()  # read once; workers inherit an empty environment
_LOW_WATER = POOL_SIZE // 2  # refill in batches from here (see prefork)
_NAMESPACES = (
    sc.CLONE_NEWUSER
    | sc.CLONE_NEWNET
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWNS
    | sc.CLONE_NEWPID
)


def _send_fds(ctrl: socket.socket, message: bytes, fds: list[int]) -> None:
    ctrl.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


class _Zygote:
    def __init__(self, ctrl: socket.socket, zygote_filter: bytes, worker_filter: bytes) -> None:
        from ..runtime import _main as runtime  # imported once; every worker inherits it

        self.ctrl = ctrl
        self.runtime = runtime
        runtime.prepare()
        self.zygote_filter = zygote_filter
        self.worker_filter = worker_filter
        self.own_pidns = -1 if INSECURE else os.open("/proc/self/ns/pid", os.O_RDONLY)
        self.pool: deque[tuple[socket.socket, int, int]] = deque()  # channel, pidfd, output
        self.next_uid = 0
        self.worker_uids: dict[int, int] = {}  # pid -> uid of each worker not yet reaped
        self.uids_in_use: set[int] = set()  # their values
        self.first_call_pages: Runs = []  # copied by each worker (see _prefault)
        # Workers (and the probes that learn what their first call does) are forked without
        # CPython's post-fork work (see _fork), which a process with no other thread does
        # not need. Asked here, while /proc is there to tell (serve covers it); fork itself
        # falls back to os.fork should a Python thread run later.
        self.fork: Callable[[], int] = fork
        if not single_threaded():
            self.fork = os.fork
            _warn("another thread may run in the zygote: workers are forked the slower way")

    def prefork(self, count: int = 1) -> None:
        """Fork ``count`` workers back to back into the pool.

        A page this process writes between two forks stays, in its old version, only in the
        earlier child: memory counted against that one worker. Pages written after a batch
        remain shared by all of its workers. So the sockets are made first and the forks
        follow each other with next to nothing in between.
        """
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(count)]
        outputs = [new_output_file() for _ in range(count)]
        pids = []
        for (_, worker_end), output in zip(pairs, outputs, strict=True):
            uid, self.next_uid = next_free_uid(self.next_uid, self.uids_in_use)
            if not INSECURE:
                sc.unshare(sc.CLONE_NEWPID)
            pid = self.fork()
            if pid == 0:
                self._become_worker(worker_end, uid, output)
            if not INSECURE:
                sc.setns(self.own_pidns, sc.CLONE_NEWPID)
            pids.append(pid)
            self.worker_uids[pid] = uid
            self.uids_in_use.add(uid)
        for (host_end, worker_end), pid, output in zip(pairs, pids, outputs, strict=True):
            worker_end.close()
            self.pool.append((host_end, os.pidfd_open(pid), output))

    def _become_worker(self, channel: socket.socket, uid: int, output: int) -> None:
        """In a freshly forked child: confine, then serve the channel. Never returns."""
        code = 1
        try:
            populate(self.first_call_pages)
            self.runtime.share_output(output)  # mapped: confine closes the descriptor
            if INSECURE:
                close_inherited(channel.fileno())
            else:
                confine(channel.fileno(), uid, self.worker_filter, SCRATCH_MB)
            code = self.runtime.serve(channel)
        except BaseException:
            pass  # confinement failed or the session broke: exit, never run unconfined
        finally:
            os._exit(code)

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The code objects a first call writes to, copied side by side (onto fresh pages: the
        # free blocks are taken first), then specialized again by a second warm-up.
        fill_free_blocks()
        if pack_hot_code(self.runtime.serve, self.fork):
            self.runtime.warm_up()
        else:
            _warn("the probe of a first call failed: hot code objects were not packed")
        self.runtime.make_loop()
        # Every worker shares this process's memory until one of them writes to it. Immortal
        # objects (3.12+) take no reference count writes, and frozen ones no collector writes:
        # the pages a worker copies are then mostly the ones it really changes.
        immortalize_heap()  # collects first
        gc.freeze()
        self.runtime.measure_base_vm()  # a worker maps what the zygote does, from here on
        collapse_heap()  # before the last fill, which takes the blocks this leaves freed
        fill_free_blocks()
        if not INSECURE:
            # From here on the zygote can do little more than its workers: fork them, give
            # each its namespaces and identity, hand them over. They inherit this filter.
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            sc.load_seccomp_bpf(self.zygote_filter)
        self.first_call_pages = learn_first_call(self.runtime.serve, self.fork)
        if not self.first_call_pages:
            _warn("the probe of a first call failed: workers will not copy its pages ahead")
        if not INSECURE:
            _cover_proc()
        self.prefork(POOL_SIZE)
        self.ctrl.send(f"ready {__version__} {code_digest()}".encode())
        while True:
            self._reap()
            timeout = 0 if len(self.pool) <= _LOW_WATER else 1.0
            readable, _, _ = select.select([self.ctrl], [], [], timeout)
            if not readable:
                if len(self.pool) <= _LOW_WATER:
                    self.prefork(POOL_SIZE - len(self.pool))
                continue
            try:
                request = self.ctrl.recv(64)
            except ConnectionResetError:  # the host closed with a reply of ours unread
                return
            if not request:
                return
            if request == b"spawn":
                if not self.pool:
                    self.prefork()
                host_end, pidfd, output = self.pool.popleft()
                try:
                    _send_fds(self.ctrl, b"worker", [host_end.fileno(), pidfd, output])
                except (BrokenPipeError, ConnectionResetError):
                    return  # the host is gone
                finally:
                    host_end.close()
                    os.close(pidfd)
                    os.close(output)

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.uids_in_use.discard(self.worker_uids.pop(pid, -1))


def _warn(message: str) -> None:
    """To the host's stderr (``sys.stderr`` captures worker output). Workers still start; they
    only take longer."""
    print(f"[workerloader] zygote: {message}", file=sys.__stderr__, flush=True)


_BUILD_AT = "/tmp"
"""Where the workers' root file system is put together before it becomes the root (any
directory would do: this one exists everywhere)."""


def _enter_worker_root() -> None:
    """Make this process's root a small tmpfs that holds only what a worker may see, and
    detach the host's file system: read-only binds of the interpreter paths and system
    libraries (``READ_ONLY_PATHS``, at their own names), /dev/null, the host's /proc (the
    zygote reads its own pages there as it starts, then covers it: ``_cover_proc``), and an
    empty /tmp for each worker's scratch. Runs as the host's root, in a mount namespace of
    its own; the workers' namespaces start from it.

    So no host file, socket or process is even named in a worker's view: Landlock and
    seccomp then guard a file system with nothing else in it.
    """
    from ._confine import UNDER_SCRATCH
    from ._policy import LIBRARY_LINKS, READ_ONLY_PATHS

    # Opened first: building on /tmp hides what is under it (a checkout there, say).
    sources = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in READ_ONLY_PATHS]
    null = os.open("/dev/null", os.O_PATH)
    root = _BUILD_AT
    sc.mount("tmpfs", root, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755")
    for path, fd in sources:
        os.makedirs(root + path, exist_ok=True)
        sc.bind_read_only(f"/proc/self/fd/{fd}", root + path)
        os.close(fd)
    for path, staged in UNDER_SCRATCH:  # a second place, outside the workers' scratch
        os.makedirs(root + staged)
        sc.bind_read_only(root + path, root + staged)
    for link in LIBRARY_LINKS:
        os.symlink(os.readlink(link), root + link)
    os.makedirs(root + "/dev", exist_ok=True)
    os.close(os.open(root + "/dev/null", os.O_CREAT | os.O_WRONLY, 0o666))
    sc.mount(f"/proc/self/fd/{null}", root + "/dev/null", None, sc.MS_BIND, None)
    os.close(null)
    os.makedirs(root + "/proc", exist_ok=True)
    sc.mount("/proc", root + "/proc", None, sc.MS_BIND | sc.MS_REC, None)
    os.makedirs(root + "/tmp", exist_ok=True)  # (an interpreter under /tmp made it)
    # The old root goes on top of the new one, then is detached: nothing of it stays.
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount(".")
    os.chdir("/")
    sc.mount("none", "/", None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV, None)


def _cover_proc() -> None:
    """Put an empty read-only tmpfs over /proc (the host's, bound there before the user
    namespace, so it cannot be unmounted here): the zygote needs it no more, and no worker
    forked from now on can list a process or read a file of one there."""
    flags = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    sc.mount("tmpfs", "/proc", "tmpfs", flags, "size=4k,mode=0555")


def main() -> None:
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    code_digest()  # read now, from the host's file system (kept for ``ready``)
    os.nice(NICE)
    if INSECURE:
        ctrl.send(b"userns")
        if ctrl.recv(16) != b"mapped":
            os._exit(1)
        _Zygote(ctrl, ctrl.recv(1 << 20), ctrl.recv(1 << 20)).serve()
        os._exit(0)
    # Shape the file system view while still the host's root, in a mount namespace of our
    # own; the user namespace's mount namespace below starts as a copy of it.
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount("none", "/", None, sc.MS_REC | sc.MS_PRIVATE, None)
    _enter_worker_root()
    sc.unshare(_NAMESPACES)
    ctrl.send(b"userns")
    if ctrl.recv(16) != b"mapped":
        os._exit(1)
    zygote_filter = ctrl.recv(1 << 20)  # the seccomp programs, compiled by the host
    worker_filter = ctrl.recv(1 << 20)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    pid = os.fork()  # the zygote proper: pid 1 of the new PID namespace
    if pid == 0:
        code = 1
        try:
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            sc.prctl(sc.PR_SET_DUMPABLE, 0)
            _Zygote(ctrl, zygote_filter, worker_filter).serve()
            code = 0
        except BaseException:
            # To the host's stderr (sys.stderr captures worker output): the zygote runs no
            # tenant code.
            traceback.print_exc(file=sys.__stderr__)
        finally:
            os._exit(code)
    ctrl.close()
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
