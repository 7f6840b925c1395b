"""The layers under the sandbox: the zygote runs under its own seccomp filter and each worker
stacks one more; the chores thread runs the host's slow calls in order; the zygote's free
blocks are filled before it forks."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from workerloader import Loader, WorkerCode
from workerloader.sandbox._chores import Chores

MAIN = """
from workers import WorkerEntrypoint

class Calc(WorkerEntrypoint):
    async def add(self, a, b):
        return a + b
"""


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


async def test_the_zygote_is_filtered_and_each_worker_stacks_one_filter_more(
    tmp_path: Path,
) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        stub = loader.get("w", lambda: WorkerCode(main_module="main.py", modules={"main.py": MAIN}))
        assert await stub.get_entrypoint("Calc").add(1, 2) == 3
        launcher = loader._sandbox._proc
        assert launcher is not None
        (zygote,) = psutil.Process(launcher.pid).children()
        worker = stub._worker
        assert worker is not None
        zygote_status, worker_status = _status(zygote.pid), _status(worker.process.pid)
    assert zygote_status["Seccomp"] == "2"  # filter mode
    assert zygote_status["Seccomp_filters"] == "1"
    assert zygote_status["NoNewPrivs"] == "1"
    assert worker_status["Seccomp"] == "2"
    assert worker_status["Seccomp_filters"] == "2"


def test_chores_run_in_order_survive_a_failing_job_and_drain_on_close() -> None:
    chores = Chores()
    done: list[int] = []
    threads: set[str] = set()

    def job(n: int) -> None:
        threads.add(threading.current_thread().name)
        done.append(n)

    def failing() -> None:
        raise RuntimeError("a job that fails")

    for n in range(50):
        chores.submit(functools.partial(job, n))
        if n == 10:
            chores.submit(failing)
    chores.close()
    assert done == list(range(50))
    assert threads == {"workerloader-chores"}
    chores.submit(functools.partial(job, 50))  # a submit after close starts the thread again
    chores.close()
    assert done[-1] == 50


def test_filling_free_blocks_takes_some_and_the_process_keeps_working() -> None:
    script = (
        "import gc, json\n"
        "from workerloader.sandbox._fill import fill_free_blocks\n"
        "taken = fill_free_blocks()\n"
        "data = [str(i) * 3 for i in range(10000)]\n"
        "gc.collect()\n"
        "print(json.dumps({'taken': taken, 'data': len(data)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stderr == ""
    result = json.loads(out.stdout)
    assert result["data"] == 10000
    assert result["taken"] > 63  # at least a block of each size glibc caches (to 1 KiB)


_HOLES = """
import ctypes, json
from workerloader.sandbox._fill import _MallInfo2, fill_free_blocks

libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.argtypes = [ctypes.c_ssize_t]
libc.mallinfo2.restype = _MallInfo2

def in_bins():
    info = libc.mallinfo2()
    return info.fordblks - info.keepcost  # free bytes but the top chunk's

blocks = [libc.malloc(size) for size in (3000, 200) for _ in range(400)]
for block in blocks[::2]:  # holes all over the heap, where best fit would place new blocks
    libc.free(block)  # (the first few small ones in glibc's cache)
before = in_bins()
fill_free_blocks()
after = in_bins()
top = libc.sbrk(0) - libc.mallinfo2().keepcost
new = [libc.malloc(size) for size in (3000, 2000, 1500, 200, 200)]
print(json.dumps({"before": before, "after": after, "from_top": all(b >= top for b in new)}))
"""


def test_filling_takes_the_free_chunks_in_the_heap_so_new_blocks_come_from_its_top() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HOLES], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout)
    assert result["before"] > 200 * 3000  # the holes
    assert result["after"] < 4096, result
    assert result["from_top"], result
