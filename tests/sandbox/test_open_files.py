"""The host's open-file limit: each live worker holds a few of its descriptors. Starting the
sandbox lifts the soft limit to the hard one (a common soft 1,024 ran out at 337 live
workers), and running out anyway is an error that says so (it was an IndexError). Each case
runs in a process of its own: the limit is process-wide."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workerloader import Loader, WorkerCode, WorkerloaderError
from workerloader.loader._worker import stop_worker
from workerloader.sandbox import _host

SCRIPT = """
import asyncio, resource, sys, tempfile
soft, hard = 1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from workerloader.loader._worker import stop_worker
from workerloader.sandbox import _host
if sys.argv[1] == "keep-limit":
    _host.raise_open_files_limit = lambda: None
from workerloader import Loader, WorkerCode, WorkerloaderError

MAIN = (
    "from workers import WorkerEntrypoint\\n"
    "class E(WorkerEntrypoint):\\n"
    "    async def one(self):\\n"
    "        return 1\\n"
)

async def main():
    with tempfile.TemporaryDirectory() as data:
        async with Loader(data, pool_size=2, max_workers=1000) as loader:
            print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)
            try:
                for i in range(int(sys.argv[2])):
                    code = WorkerCode(main_module="main.py", modules={"main.py": MAIN})
                    await loader.get(f"w{i}", lambda: code).get_entrypoint("E").one()
                print("live", i + 1)
            except WorkerloaderError as exc:
                print("refused:", exc)

asyncio.run(main())
"""


def run(tmp_path: Path, mode: str, workers: int) -> list[str]:
    script = tmp_path / "open_files.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), mode, str(workers)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_sandbox_lifts_the_soft_limit_so_hundreds_of_workers_fit(tmp_path: Path) -> None:
    assert run(tmp_path, "lift", 400) == ["soft True", "live 400"]


def test_running_out_of_descriptors_is_an_error_that_says_so(tmp_path: Path) -> None:
    soft, result = run(tmp_path, "keep-limit", 400)
    assert soft == "soft False"
    assert result.startswith(
        "refused: this process is out of file descriptors (RLIMIT_NOFILE 1024): each live "
        "worker holds a few; raise the limit (ulimit -n) or lower max_workers"
    ), result


async def test_a_worker_taken_over_without_a_descriptor_left_says_so_and_leaks_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taking a worker over needs a descriptor beyond the three it is sent (a read of its
    # pid): at the limit, that step fails (here made to, at once).
    async with Loader(tmp_path, pool_size=1) as loader:
        main = "async def fetch(request, env, ctx):\n    pass\n"
        code = WorkerCode(main_module="main.py", modules={"main.py": main})
        await loader.load(code)  # the ready queue filled, the host's descriptors in use
        await asyncio.sleep(0.5)
        before = len(os.listdir("/proc/self/fd"))

        def no_descriptor(*args: object) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(_host, "_pid_of", no_descriptor)
        while loader._ready:  # a worker taken now comes from the sandbox
            await stop_worker(*loader._ready.popleft())
        with pytest.raises(WorkerloaderError, match=r"^this process is out of file descriptors"):
            await loader.load(code)
        monkeypatch.undo()
        await loader.load(code)
        await asyncio.sleep(0.5)
        assert len(os.listdir("/proc/self/fd")) <= before


async def _a_ready_worker(loader: Loader) -> _host.WorkerProcess:
    for _ in range(400):
        if loader._ready:
            process, session = loader._ready.popleft()
            await session.aclose()
            return process
        await asyncio.sleep(0.01)
    raise AssertionError("no worker became ready")


async def test_a_workers_descriptors_are_not_inherited_by_programs_the_host_runs(
    tmp_path: Path,
) -> None:
    async with Loader(tmp_path, pool_size=1) as loader:
        process = await _a_ready_worker(loader)
        assert process.output is not None
        for fd in (process.channel.fileno(), process.pidfd, process.output):
            assert not os.get_inheritable(fd), fd
        await process.aclose()


async def test_a_worker_closed_while_its_stop_is_cancelled_leaves_no_descriptor(
    tmp_path: Path,
) -> None:
    async with Loader(tmp_path, pool_size=1) as loader:
        process = await _a_ready_worker(loader)
        await asyncio.sleep(0.2)  # the ready queue's refill is done
        before = len(os.listdir("/proc/self/fd"))
        closing = asyncio.ensure_future(process.aclose())
        await asyncio.sleep(0)  # now waiting for the worker's exit
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert process.output is None
        assert process.channel.fileno() == -1
        await asyncio.sleep(0.2)  # the chores thread closes the pidfd
        # Its pidfd and output file (its channel went with the session closed above).
        assert len(os.listdir("/proc/self/fd")) <= before - 2
