"""A worker's scratch directory (/tmp, its own tmpfs) takes everyday file operations, as the
standard library makes them; anywhere else they are refused."""

from __future__ import annotations

from pathlib import Path

from workerloader import Loader, WorkerCode

FILES = """
import os
import shutil
import tempfile
from workers import WorkerEntrypoint


def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return exc.strerror


class Files(WorkerEntrypoint):
    async def in_scratch(self):
        steps = {}
        steps["makedirs"] = attempt(lambda: os.makedirs("/tmp/a/b/c"))
        steps["write"] = attempt(lambda: open("/tmp/a/b/c/f.txt", "w").write("hello"))
        steps["rename"] = attempt(lambda: os.rename("/tmp/a/b/c/f.txt", "/tmp/a/g.txt"))
        steps["symlink"] = attempt(lambda: os.symlink("/tmp/a/g.txt", "/tmp/a/link"))
        steps["read"] = open("/tmp/a/link").read()
        steps["unlink"] = attempt(lambda: os.unlink("/tmp/a/link"))
        steps["tempfile"] = attempt(lambda: tempfile.NamedTemporaryFile(dir="/tmp").close())
        steps["rmtree"] = attempt(lambda: shutil.rmtree("/tmp/a"))
        steps["gone"] = not os.path.exists("/tmp/a")  # /tmp may also hold interpreter binds
        return steps

    async def elsewhere(self, path):
        return {
            "mkdir": attempt(lambda: os.mkdir(path + "/wl-dir")),
            "write": attempt(lambda: open(path + "/wl-file", "w").write("x")),
        }
"""


def files_code() -> WorkerCode:
    return WorkerCode(main_module="main.py", modules={"main.py": FILES})


async def test_file_operations_work_in_scratch(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        steps = await loader.get("f", files_code).get_entrypoint("Files").in_scratch()
    assert steps == {
        "makedirs": "ok",
        "write": "ok",
        "rename": "ok",
        "symlink": "ok",
        "read": "hello",
        "unlink": "ok",
        "tempfile": "ok",
        "rmtree": "ok",
        "gone": True,
    }


async def test_the_same_operations_are_refused_outside_scratch(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        files = loader.get("f", files_code).get_entrypoint("Files")
        for path in ("/", "/var/tmp", str(tmp_path)):
            outcome = await files.elsewhere(path)
            assert "ok" not in outcome.values(), (path, outcome)
    assert not (tmp_path / "wl-dir").exists()
    assert not (tmp_path / "wl-file").exists()
