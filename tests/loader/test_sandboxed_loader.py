"""The Loader against the real sandbox: isolation, limits and errors as a tenant meets them."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from workerloader import (
    CpuLimitExceeded,
    Limits,
    Loader,
    WallTimeExceeded,
    WorkerCode,
    WorkerError,
    WorkerLoadError,
)

PROBE = """
import os, socket
from workers import WorkerEntrypoint, Response


def _files_in_scratch():
    # Files only: where the interpreter itself lives under /tmp (a CI checkout), its
    # read-only directories show in the worker's /tmp too.
    return sorted(n for n in os.listdir("/tmp") if os.path.isfile("/tmp/" + n))


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(f"{self.env.GREETING}, {request.url}")

class Probe(WorkerEntrypoint):
    async def read(self, path):
        with open(path, "rb") as f:
            return len(f.read())

    async def imports(self, names):
        import importlib
        return len([importlib.import_module(name) for name in names])

    async def connect(self):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))

    async def fork(self):
        return os.fork()

    async def identity(self):
        return {"uid": os.getuid(), "pid": os.getpid(), "env": dict(os.environ)}

    async def scratch(self):
        with open("/tmp/note", "w") as f:
            f.write("kept")
        return _files_in_scratch()

    async def spin(self):
        while True:
            pass

    async def sleep_forever(self):
        import time
        time.sleep(3600)

    async def talk(self):
        print("one")
        print("two")
        return 42

    async def fail(self):
        class Custom(Exception):
            pass
        raise Custom("it broke")
"""


def code(**limits: int) -> WorkerCode:
    return WorkerCode(
        main_module="main.py",
        modules={"main.py": PROBE},
        env={"GREETING": "hi"},
        limits=Limits(**limits) if limits else Limits(),
    )


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


async def test_fetch_and_named_entrypoints(loader: Loader) -> None:
    stub = loader.get("w", code)
    response = await stub.fetch("https://greeter/")
    assert response.status == 200
    assert await response.text() == "hi, https://greeter/"
    assert await stub.get_entrypoint("Probe").talk() == 42
    assert stub.logs == ["one", "two"]


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/hostname", "/proc/1/environ"])
async def test_host_files_are_not_even_there(loader: Loader, path: str) -> None:
    # A worker's file system holds the interpreter and its libraries, nothing else.
    probe = loader.get("w", code).get_entrypoint("Probe")
    with pytest.raises(FileNotFoundError):
        await probe.read(path)


async def test_a_host_data_dir_is_not_even_there(loader: Loader) -> None:
    # Not under /tmp, which each worker replaces with its own tmpfs.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as data_dir:
        secret = Path(data_dir) / "secret.txt"
        secret.write_text("host secret")
        with pytest.raises(FileNotFoundError):
            await loader.get("w", code).get_entrypoint("Probe").read(str(secret))


async def test_standard_modules_that_link_system_libraries_import(loader: Loader) -> None:
    # zlib, sqlite3, ssl, lzma and bz2 load shared libraries of the system's, which a
    # worker's file system holds read-only beside the interpreter.
    probe = loader.get("w", code).get_entrypoint("Probe")
    assert await probe.imports(["zlib", "sqlite3", "ssl", "lzma", "bz2", "ctypes"]) == 6


async def test_no_network_and_no_new_processes(loader: Loader) -> None:
    probe = loader.get("w", code).get_entrypoint("Probe")
    with pytest.raises(PermissionError):
        await probe.connect()
    with pytest.raises(PermissionError):
        await probe.fork()


async def test_each_worker_has_its_own_uid_pid_namespace_and_no_host_environment(
    loader: Loader,
) -> None:
    a = await loader.get("a", code).get_entrypoint("Probe").identity()
    b = await loader.get("b", code).get_entrypoint("Probe").identity()
    assert a["pid"] == b["pid"] == 1
    assert a["uid"] != b["uid"]
    assert a["uid"] != 0
    assert a["env"] == {} or set(a["env"]) <= {"LC_CTYPE"}


async def test_scratch_is_private_to_each_worker(loader: Loader) -> None:
    assert await loader.get("a", code).get_entrypoint("Probe").scratch() == ["note"]
    assert await loader.get("b", code).get_entrypoint("Probe").scratch() == ["note"]


async def test_cpu_limit_kills_a_busy_loop_and_the_next_call_gets_a_fresh_worker(
    loader: Loader,
) -> None:
    stub = loader.get("w", lambda: code(cpu_ms=100, wall_ms=5000))
    with pytest.raises(CpuLimitExceeded, match=r"^the call used more than 100 ms of CPU$"):
        await stub.get_entrypoint("Probe").spin()
    assert await stub.get_entrypoint("Probe").talk() == 42


async def test_wall_limit_kills_a_sleeping_call(loader: Loader) -> None:
    stub = loader.get("w", lambda: code(cpu_ms=1000, wall_ms=300))
    with pytest.raises(WallTimeExceeded, match=r"^the call took longer than 300 ms$"):
        await stub.get_entrypoint("Probe").sleep_forever()


async def test_user_exceptions_carry_user_frames_and_lines(loader: Loader) -> None:
    with pytest.raises(WorkerError) as info:
        await loader.get("w", code).get_entrypoint("Probe").fail()
    assert info.value.type_name == "Custom"
    line = PROBE.splitlines().index('        raise Custom("it broke")') + 1
    assert f'File "main.py", line {line}, in fail' in info.value.traceback
    assert "workerloader" not in info.value.traceback


async def test_syntax_errors_surface_on_first_call_with_file_and_line(loader: Loader) -> None:
    stub = loader.get(
        "bad", lambda: WorkerCode(main_module="main.py", modules={"main.py": "x = (\n"})
    )
    with pytest.raises(WorkerLoadError, match=r"^main.py:1: SyntaxError: '\(' was never closed$"):
        await stub.fetch("https://x/")


async def test_load_validates_eagerly(loader: Loader) -> None:
    with pytest.raises(WorkerLoadError, match=r"^ValueError: main module 'nope.py'"):
        await loader.load(WorkerCode(main_module="nope.py", modules={"main.py": "x = 1"}))
