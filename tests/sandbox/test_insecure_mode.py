"""Where the sandbox is missing, the Loader refuses unless told ``insecure=True``."""

from __future__ import annotations

from pathlib import Path

import pytest

from workerloader import Loader, SandboxUnavailable, WorkerCode
from workerloader.sandbox import _host

MAIN = """
import os
from workers import WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def pid(self):
        print("ran")
        return os.getpid()
"""


@pytest.fixture
def no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this machine lacks namespaces (the real check runs in every other test)."""
    monkeypatch.setattr(_host, "sandbox_support", lambda: "namespaces are missing (test)")


@pytest.mark.usefixtures("no_sandbox")
async def test_loader_refuses_without_a_sandbox(tmp_path: Path) -> None:
    with pytest.raises(
        SandboxUnavailable,
        match=r"^namespaces are missing \(test\); workers would run unconfined\. .*insecure=True",
    ):
        async with Loader(tmp_path):
            pass


@pytest.mark.usefixtures("no_sandbox")
async def test_insecure_mode_runs_and_says_so_in_every_calls_logs(tmp_path: Path) -> None:
    async with Loader(tmp_path, pool_size=1, insecure=True) as loader:
        stub = loader.get("w", lambda: WorkerCode(main_module="main.py", modules={"main.py": MAIN}))
        pid = await stub.get_entrypoint().pid()
        assert pid != 1  # no PID namespace: visibly unconfined
        assert stub.logs[0].startswith("[workerloader] insecure mode:")
        assert stub.logs[1:] == ["ran"]


def test_this_machine_has_the_sandbox() -> None:
    assert _host.sandbox_support() is None
