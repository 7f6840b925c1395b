"""What a hostile tenant tries inside the real sandbox, and the precise outcome of each attempt.

Every test runs tenant code in a real confined worker (namespaces, uid, rlimits, Landlock,
seccomp) and asserts what the tenant sees: the errno of a denied system call, the exception a
blocked operation raises, the typed limit error the host raises when it kills a worker, and that
the host itself is left as it was.
"""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from workerloader import (
    CpuLimitExceeded,
    LimitExceeded,
    Limits,
    Loader,
    MemoryLimitExceeded,
    WallTimeExceeded,
    WorkerCode,
    WorkerCrashed,
)

HOSTILE = """
import ctypes, errno, os, re, signal, socket, sys
from workers import WorkerEntrypoint


def _files_in_scratch():
    # Files only: where the interpreter itself lives under /tmp (a CI checkout), its
    # read-only directories show in the worker's /tmp too.
    return sorted(n for n in os.listdir("/tmp") if os.path.isfile("/tmp/" + n))


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
calls = 0
forks = 0
hoard = []


def outcome(result):
    return [result, ctypes.get_errno()]


class Tenant(WorkerEntrypoint):
    async def count(self):
        global calls
        calls += 1
        return calls

    async def ptrace_traceme(self):
        ctypes.set_errno(0)
        return outcome(libc.ptrace(0, 0, 0, 0))

    async def unshare_user(self):
        ctypes.set_errno(0)
        return outcome(libc.unshare(0x10000000))

    async def mount_tmpfs(self):
        ctypes.set_errno(0)
        return outcome(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))

    async def raw_syscall(self, nr, args):
        # "buf" stands for a zeroed 4 KiB buffer, so that the call would succeed unfiltered.
        buf = ctypes.create_string_buffer(4096)
        real = [ctypes.c_void_p(ctypes.addressof(buf)) if a == "buf" else ctypes.c_long(a)
                for a in args]
        ctypes.set_errno(0)
        return outcome(libc.syscall(ctypes.c_long(nr), *real))

    async def kill(self, pid):
        os.kill(pid, 0)

    async def getpid(self):
        return os.getpid()

    async def write_scratch(self, name):
        with open("/tmp/" + name, "w") as f:
            f.write("mine")
        return _files_in_scratch()

    async def list_scratch(self):
        return _files_in_scratch()

    async def write(self, path):
        if path == "{prefix}":
            path = os.path.join(sys.prefix, "tenant-was-here")
        try:
            with open(path, "w") as f:
                f.write("x")
        except OSError as exc:
            return [type(exc).__name__, exc.errno, path]
        return ["written", None, path]

    async def inet_socket(self, family):
        socket.socket(getattr(socket, family), socket.SOCK_STREAM)

    async def unix_connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("/tmp/x")
        finally:
            s.close()

    async def datagram_to(self, path, how):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if how == "sendto":
                s.sendto(b"from a tenant", path)
            else:
                s.sendmsg([b"from a tenant"], [], 0, path)
        finally:
            s.close()

    async def touch(self, path):
        os.utime(path)

    async def stat(self, path):
        return os.stat(path).st_size

    async def i386_call_in_a_thread(self):
        # int 0x80 (i386's getpid) from a page of machine code, run by a second thread.
        import mmap, threading
        code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        thread = threading.Thread(target=ctypes.CFUNCTYPE(ctypes.c_int)(address))
        thread.start()
        thread.join()
        return "survived"

    async def reach(self, port):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    async def environ(self):
        return dict(os.environ)

    async def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    async def fork_bomb(self):
        global forks
        while True:
            os.fork()
            forks += 1

    async def forks(self):
        return forks

    async def memory_bomb(self):
        b = bytearray(2 * 1024**3)
        return len(b)

    async def big_answer(self):
        return "x" * (40 * 1024**2)  # fits in memory, its encoded copies do not

    async def keep_allocating(self):
        while True:
            try:
                hoard.append(bytearray(16 * 1024**2))
            except MemoryError:
                pass

    async def ignore_sigterm(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            pass

    async def backtrack(self):
        return re.match(r"(a+)+$", "a" * 40 + "b") is not None

    async def spin(self):
        while True:
            pass

    async def print_then(self, what):
        print("started", what)
        print("é" * 3)
        if what == "spin":
            while True:
                pass
        elif what == "sleep":
            import time
            time.sleep(60)
        else:
            os._exit(3)

    async def exit(self):
        os._exit(3)
"""

DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}  # ENOENT: not in its view


def exists(path: str) -> bool:
    return os.path.exists(path)


def hostile(**limits: int) -> Callable[[], WorkerCode]:
    def factory() -> WorkerCode:
        return WorkerCode(
            main_module="main.py",
            modules={"main.py": HOSTILE},
            limits=Limits(**limits) if limits else Limits(),
        )

    return factory


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


def tenant(loader: Loader, worker_id: str = "t", **limits: int) -> Any:
    return loader.get(worker_id, hostile(**limits)).get_entrypoint("Tenant")


# ---------------------------------------------------------------------------------------------
# Dangerous system calls


async def test_ptrace_is_denied(loader: Loader) -> None:
    # PTRACE_TRACEME would succeed for any unfiltered process.
    assert await tenant(loader).ptrace_traceme() == [-1, errno.EPERM]


async def test_unshare_of_a_user_namespace_is_denied(loader: Loader) -> None:
    assert await tenant(loader).unshare_user() == [-1, errno.EPERM]


async def test_mount_is_denied(loader: Loader) -> None:
    assert await tenant(loader).mount_tmpfs() == [-1, errno.EPERM]


X86_64_SYSCALLS = {
    # name: (number, arguments that make the call succeed where it is not filtered)
    "bpf": (321, [0, "buf", 72]),  # BPF_MAP_CREATE
    "keyctl": (250, [0, -3, 1]),  # KEYCTL_GET_KEYRING_ID of the session keyring, create
    "io_uring_setup": (425, [1, "buf"]),
    "unshare": (272, [0x10000000]),  # CLONE_NEWUSER
    "ptrace": (101, [0, 0, 0, 0]),  # PTRACE_TRACEME
    # What the zygote's own filter allows and each worker's stacked filter takes away again:
    "pidfd_open": (434, [1, 0]),  # the worker itself (pid 1 of its namespace)
    "prctl": (157, [3, 0, 0, 0, 0]),  # PR_GET_DUMPABLE
    "setresuid": (117, [-1, -1, -1]),  # no change
    "setresgid": (119, [-1, -1, -1]),
    "dup2": (33, [0, 0]),
    "setns": (308, [-1, 0x20000000]),  # EBADF if it were allowed
    "landlock_create_ruleset": (444, [0, 0, 1]),  # LANDLOCK_CREATE_RULESET_VERSION
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="raw system call numbers are x86_64's")
@pytest.mark.parametrize("name", sorted(X86_64_SYSCALLS))
async def test_raw_system_calls_are_denied(loader: Loader, name: str) -> None:
    nr, args = X86_64_SYSCALLS[name]
    assert await tenant(loader).raw_syscall(nr, args) == [-1, errno.EPERM]


# ---------------------------------------------------------------------------------------------
# Other processes and other workers


async def test_no_other_process_is_visible(loader: Loader) -> None:
    t = tenant(loader)
    assert await t.getpid() == 1
    # Outside a PID namespace pid 2 is kthreadd, and signalling it gives EPERM, not ESRCH.
    for pid in (2, os.getpid()):
        with pytest.raises(ProcessLookupError):
            await t.kill(pid)


async def test_scratch_files_of_one_worker_are_invisible_to_another(loader: Loader) -> None:
    a, b = tenant(loader, "a"), tenant(loader, "b")
    assert await a.write_scratch("a") == ["a"]
    assert await b.list_scratch() == []
    assert await b.write_scratch("b") == ["b"]
    assert await a.list_scratch() == ["a"]


# ---------------------------------------------------------------------------------------------
# The filesystem


@pytest.mark.parametrize("path", ["/tenant-was-here", "/var/tmp/x", "/root/x", "{prefix}"])
async def test_nothing_outside_scratch_is_writable(loader: Loader, path: str) -> None:
    kind, code, where = await tenant(loader).write(path)
    assert kind in {"PermissionError", "OSError", "FileNotFoundError"}, (kind, where)
    assert code in DENIED, (errno.errorcode.get(code, code), where)
    assert not exists(where)


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("family", ["AF_INET", "AF_INET6"])
async def test_internet_sockets_cannot_be_created(loader: Loader, family: str) -> None:
    with pytest.raises(PermissionError):
        await tenant(loader).inet_socket(family)


async def test_unix_sockets_cannot_connect(loader: Loader) -> None:
    # Unfiltered, connecting to a path that does not exist is FileNotFoundError.
    with pytest.raises(PermissionError):
        await tenant(loader).unix_connect()


@pytest.mark.parametrize("how", ["sendto", "sendmsg"])
async def test_a_host_unix_socket_gets_no_datagram(loader: Loader, how: str) -> None:
    # Not under /tmp (each worker's scratch): a world-writable socket of the host's own.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as where:
        path = os.path.join(where, "listening.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(path)
        os.chmod(where, 0o777)
        os.chmod(path, 0o777)
        # sendto with an address is refused outright; sendmsg finds no such path in the view.
        expected = PermissionError if how == "sendto" else FileNotFoundError
        with pytest.raises(expected):
            await tenant(loader).datagram_to(path, how)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.recv(100)
        listener.close()


async def test_host_files_cannot_be_touched_or_even_stated(loader: Loader) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as where:
        victim = os.path.join(where, "world-writable")
        os.close(os.open(victim, os.O_CREAT | os.O_WRONLY))
        os.chmod(where, 0o777)
        os.chmod(victim, 0o666)
        os.utime(victim, (1e9, 1e9))
        t = tenant(loader)
        with pytest.raises(FileNotFoundError):
            await t.touch(victim)
        assert os.stat(victim).st_mtime == 1e9
        for path in (victim, "/etc/shadow", "/proc/1"):
            with pytest.raises(FileNotFoundError):
                await t.stat(path)


async def test_an_i386_system_call_in_any_thread_kills_the_worker(loader: Loader) -> None:
    t = tenant(loader)
    with pytest.raises(WorkerCrashed):
        await t.i386_call_in_a_thread()
    assert await t.count() == 1  # a fresh worker


async def test_host_loopback_is_unreachable(loader: Loader) -> None:
    connections: list[object] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(PermissionError):
            await tenant(loader).reach(port)
        await asyncio.sleep(0.1)
    finally:
        server.close()
        await server.wait_closed()
    assert connections == []


# ---------------------------------------------------------------------------------------------
# The host's environment


async def test_host_environment_variables_are_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WL_TEST_SECRET", "s3cret")
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        t = tenant(loader)
        environ = await t.environ()
        assert "WL_TEST_SECRET" not in environ
        assert "s3cret" not in environ.values()
        with pytest.raises(FileNotFoundError):  # a worker's /proc is empty
            await t.read("/proc/self/environ")


# ---------------------------------------------------------------------------------------------
# Processes and limits


async def test_a_fork_bomb_fails_at_the_first_fork_and_the_worker_lives_on(
    loader: Loader,
) -> None:
    t = tenant(loader)
    with pytest.raises(PermissionError):
        await t.fork_bomb()
    assert await t.forks() == 0  # the same warm worker answers, and it never forked


LIMIT_CASES = [
    pytest.param("memory_bomb", {"memory_mb": 64}, MemoryLimitExceeded, id="memory-bomb"),
    pytest.param("big_answer", {"memory_mb": 64}, MemoryLimitExceeded, id="answer-too-big"),
    pytest.param(
        "keep_allocating", {"cpu_ms": 200, "memory_mb": 64}, LimitExceeded, id="memoryerror-loop"
    ),
    pytest.param("ignore_sigterm", {"cpu_ms": 100}, CpuLimitExceeded, id="sigterm-ignored"),
    pytest.param("backtrack", {"cpu_ms": 200}, CpuLimitExceeded, id="regex-backtracking"),
]


@pytest.mark.parametrize(("method", "limits", "expected"), LIMIT_CASES)
async def test_a_limit_ends_the_call_and_the_next_call_gets_a_fresh_worker(
    loader: Loader, method: str, limits: dict[str, int], expected: type[LimitExceeded]
) -> None:
    t = tenant(loader, "t", **limits)
    assert await t.count() == 1
    with pytest.raises(expected) as info:
        await getattr(t, method)()
    assert isinstance(info.value, LimitExceeded)
    # A fresh worker: the module-level counter starts again.
    assert await t.count() == 1


@pytest.mark.parametrize(
    ("what", "limits", "expected"),
    [
        ("spin", {"cpu_ms": 100}, CpuLimitExceeded),
        ("sleep", {"wall_ms": 1000}, WallTimeExceeded),
        ("exit", {}, WorkerCrashed),
    ],
)
async def test_what_a_call_printed_before_it_was_ended_reaches_the_caller(
    loader: Loader, what: str, limits: dict[str, int], expected: type[Exception]
) -> None:
    stub = loader.get("t", hostile(**limits))
    await stub.get_entrypoint("Tenant").count()
    with pytest.raises(expected) as info:
        await stub.get_entrypoint("Tenant").print_then(what)
    assert info.value.logs == [f"started {what}", "ééé"]  # type: ignore[attr-defined]
    assert stub.logs == [f"started {what}", "ééé"]


async def test_a_worker_that_exits_during_a_call_crashes_and_the_next_call_works(
    loader: Loader,
) -> None:
    t = tenant(loader)
    assert await t.count() == 1
    with pytest.raises(WorkerCrashed, match=r"^the worker process died during the call$"):
        await t.exit()
    assert await t.count() == 1


# ---------------------------------------------------------------------------------------------
# The host after many workers


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _no_children_within(me: psutil.Process, seconds: float) -> list[psutil.Process]:
    """The descendants still alive after up to ``seconds`` (processes exit asynchronously)."""
    for _ in range(int(seconds / 0.05)):
        children: list[psutil.Process] = me.children(recursive=True)
        if not children:
            return []
        await asyncio.sleep(0.05)
    remaining: list[psutil.Process] = me.children(recursive=True)
    return remaining


async def test_the_host_is_left_as_it_was(tmp_path: Path) -> None:
    me = psutil.Process()
    # What earlier tests stopped may still be exiting: start from a host with no descendants.
    assert await _no_children_within(me, 5) == []
    fds, rss = open_fds(), me.memory_info().rss

    loader = Loader(tmp_path / "data", pool_size=2)
    await loader.__aenter__()
    try:
        assert me.children(recursive=True) != []  # the sandbox is really running
        for i in range(30):
            assert await tenant(loader, f"w{i}").count() == 1
            await loader.evict(f"w{i}")
        for i in range(3):
            with pytest.raises(CpuLimitExceeded):
                await tenant(loader, f"spin{i}", cpu_ms=50).spin()
        for i in range(2):  # left warm for aclose to stop
            assert await tenant(loader, f"warm{i}").count() == 1
    finally:
        await loader.aclose()
    await asyncio.sleep(0.2)

    assert open_fds() == fds
    assert me.children(recursive=True) == []
    assert me.memory_info().rss - rss < 50 * 1024**2


async def test_a_worker_answering_nonsense_is_a_crash_not_a_host_error(tmp_path: Path) -> None:
    """The host checks the shape of what a worker returns: a compromised runtime that answers
    with garbage gets the worker retired and a typed error, never an opaque host exception."""
    from workerloader import WorkerCrashed

    async with Loader(tmp_path / "data", pool_size=2) as loader:
        stub = loader.get("w", lambda: WorkerCode(main_module="main.py", modules={"main.py": ""}))
        worker = await stub._running()

        async def garbage(method: str, *args: object) -> object:
            return {"logs": "not a list", "error": 42}

        worker.call = garbage  # type: ignore[method-assign,assignment]
        with pytest.raises(WorkerCrashed, match=r"^the worker sent a malformed answer: "):
            await stub.get_entrypoint().anything()
        assert stub._worker is None
