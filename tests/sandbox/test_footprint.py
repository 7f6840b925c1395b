"""What the zygote leaves out: every module it imports is memory and mappings that each fork
copies and each worker's exit tears down, so modules a worker does not need stay out (a
tenant's code may still import them)."""

from __future__ import annotations

from pathlib import Path

from workerloader import Loader, WorkerCode

LISTS_MODULES = (
    "import sys\n"
    "from workers import WorkerEntrypoint\n"
    "class E(WorkerEntrypoint):\n"
    "    async def modules(self):\n"
    "        return sorted(sys.modules)\n"
)
LEFT_OUT = {
    "_ssl": "OpenSSL, which asyncio imports for TLS only",
    "_hashlib": "OpenSSL again, by way of hashlib",
    "pathlib": "urllib and ipaddress with it",
    "tempfile": "shutil and three compression modules with it",
}


async def test_a_new_worker_holds_none_of_the_modules_left_out(tmp_path: Path) -> None:
    code = WorkerCode(main_module="main.py", modules={"main.py": LISTS_MODULES})
    async with Loader(tmp_path / "data", pool_size=1) as loader:
        modules = await loader.get("w", lambda: code).get_entrypoint("E").modules()
    assert "asyncio" in modules  # the list is the worker's own
    assert sorted(set(LEFT_OUT) & set(modules)) == []
