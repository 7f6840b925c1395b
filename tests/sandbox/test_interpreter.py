"""The interpreter workers run on (``Loader(sandbox_python=...)``, ``serve --sandbox-python``):
another than the host's, and what the host says when it cannot be used."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests._proc import pid_exists
from tests.server.conftest import running
from workerloader import Loader, SandboxUnavailable, WorkerCode, __version__
from workerloader.cli import main as cli
from workerloader.sandbox import _host
from workerloader.server import ServerConfig

MAIN = (
    "from workers import WorkerEntrypoint\n"
    "class E(WorkerEntrypoint):\n"
    "    async def add(self, a, b):\n"
    "        return a + b\n"
)


def wrapper(tmp_path: Path, body: str) -> str:
    """An executable shell script standing in for an interpreter; it writes its pid to
    ``pid`` (exec keeps it) and then runs ``body``."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\n{body}\n")
    script.chmod(0o755)
    return str(script)


async def test_workers_run_on_the_interpreter_given(tmp_path: Path) -> None:
    python = wrapper(tmp_path, f'exec {sys.executable} "$@"')
    code = WorkerCode(main_module="main.py", modules={"main.py": MAIN})
    async with Loader(tmp_path / "data", pool_size=2, sandbox_python=python) as loader:
        assert await loader.get("w", lambda: code).get_entrypoint("E").add(2, 3) == 5
        zygote = int((tmp_path / "pid").read_text())
        assert pid_exists(zygote)  # the zygote is the process the wrapper became
    assert not pid_exists(zygote)


def zygote_with(tmp_path: Path, setup: str) -> str:
    """A stand-in interpreter that runs the real zygote after ``setup`` (Python, one line)."""
    run = "import runpy; runpy.run_module('workerloader.sandbox._zygote', run_name='__main__')"
    # The zygote's control socket is the last argument.
    return wrapper(
        tmp_path, f'for fd; do :; done; exec {sys.executable} -I -c "{setup}; {run}" "$fd"'
    )


@pytest.mark.parametrize(
    ("setup", "said"),
    [
        (
            "import workerloader; workerloader.__version__ = '0.0.0+other'",
            "imports workerloader 0.0.0+other; this host runs",
        ),
        (  # the same version, other sources (another checkout or install)
            "from workerloader.sandbox import _identity; _identity.code_digest = lambda: 'x'",
            "from other sources than this host's",
        ),
        (  # a zygote from before its ready named its version
            "import socket; send = socket.socket.send; "
            "socket.socket.send = lambda s, d, *a: send(s, d[:5] if d[:6] == b'ready ' else d, *a)",
            "imports an older workerloader than this host's",
        ),
    ],
)
async def test_an_interpreter_with_other_workerloader_code_is_refused(
    tmp_path: Path, setup: str, said: str
) -> None:
    # Host and zygote speak a protocol of this code: another one is not started on.
    python = zygote_with(tmp_path, setup)
    loader = Loader(tmp_path / "data", pool_size=2, sandbox_python=python)
    with pytest.raises(SandboxUnavailable) as raised:
        await loader.__aenter__()
    assert said in str(raised.value)
    assert python in str(raised.value)
    assert __version__ in str(raised.value)
    assert not pid_exists(int((tmp_path / "pid").read_text()))  # the zygote was stopped, not left


async def test_a_relative_interpreter_path_is_the_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The zygote starts in / with a PATH of its own: the path is resolved where it was given.
    wrapper(tmp_path, f'exec {sys.executable} "$@"')
    monkeypatch.chdir(tmp_path)
    code = WorkerCode(main_module="main.py", modules={"main.py": MAIN})
    async with Loader(tmp_path / "data", pool_size=2, sandbox_python="./python") as loader:
        assert await loader.get("w", lambda: code).get_entrypoint("E").add(1, 1) == 2
    assert (tmp_path / "pid").exists()


async def test_a_zygote_that_never_answers_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_host, "_START_TIMEOUT_S", 1.0)
    python = wrapper(tmp_path, "exec sleep 30")
    with pytest.raises(SandboxUnavailable, match="did not start within 1 s"):
        await Loader(tmp_path / "data", pool_size=2, sandbox_python=python).__aenter__()
    assert not pid_exists(int((tmp_path / "pid").read_text()))


async def test_an_interpreter_without_workerloader_is_named(tmp_path: Path) -> None:
    python = wrapper(tmp_path, 'exec /bin/sh -c "exit 1"')
    with pytest.raises(SandboxUnavailable, match="exited as it started") as raised:
        await Loader(tmp_path / "data", pool_size=2, sandbox_python=python).__aenter__()
    assert f"its interpreter {python} lacks workerloader" in str(raised.value)


async def test_a_missing_interpreter_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-python")
    with pytest.raises(SandboxUnavailable, match="cannot run the sandbox's interpreter"):
        await Loader(tmp_path / "data", pool_size=2, sandbox_python=missing).__aenter__()


async def test_the_service_runs_its_workers_on_its_sandbox_python(tmp_path: Path) -> None:
    python = wrapper(tmp_path, f'exec {sys.executable} "$@"')
    config = ServerConfig(data_dir=tmp_path / "data", pool_size=2, sandbox_python=python)
    async with running(config) as client:
        answer = await client.post("/execute", json={"code": "return 2 + 2"})
        assert answer.json()["result"] == 4
        assert pid_exists(int((tmp_path / "pid").read_text()))


def test_workers_put_loads_the_worker_on_the_interpreter_given(tmp_path: Path) -> None:
    python = wrapper(tmp_path, f'exec {sys.executable} "$@"')
    site = tmp_path / "site"
    site.mkdir()
    (site / "main.py").write_text(MAIN)
    env = {"WORKERLOADER_SANDBOX_PYTHON": python}
    data = str(tmp_path / "data")
    result = CliRunner().invoke(
        cli, ["workers", "put", "w", str(site), "--data-dir", data], env=env
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pid").exists()  # the check's zygote ran on it
