"""The zygote's fork without CPython's post-fork work (``sandbox._fork``): it forks, tells a
single-threaded process from one with a second thread, reseeds ``random`` in each child, and
never hands a child a signal its parent caught."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from workerloader import Loader, WorkerCode
from workerloader.sandbox._fork import single_threaded

_FORKS = """
import os, random, sys
from workerloader.sandbox._fork import fork, single_threaded

assert single_threaded()
draws = []
for _ in range(2):
    read, write = os.pipe()
    pid = fork()
    if pid == 0:
        os.write(write, repr(random.random()).encode())
        os._exit(0)
    os.close(write)
    draws.append(os.read(read, 100).decode())
    os.close(read)
    assert os.waitpid(pid, 0)[1] == 0
draws.append(repr(random.random()))
print(" ".join(draws))
"""


def test_the_forks_children_and_parent_each_draw_their_own_random_numbers() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FORKS], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    draws = done.stdout.split()
    assert len(draws) == 3
    assert len(set(draws)) == 3  # random was imported before the forks: each child reseeded


_SIGNALS = """
import os, signal
from workerloader.sandbox._fork import fork

caught = []
signal.signal(signal.SIGALRM, lambda *_: caught.append(os.getpid()))
ballast = [bytearray(1 << 20) for _ in range(100)]  # a slower fork: a wider window
signal.setitimer(signal.ITIMER_REAL, 0.00005, 0.00005)
twice = 0
for _ in range(200):
    read, write = os.pipe()
    pid = fork()
    if pid == 0:
        steps = [0, 1, 2]  # bytecode, where a pending handler would run
        os.write(write, b"1" if os.getpid() in caught else b"0")
        os._exit(0)
    os.close(write)
    twice += os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)
signal.setitimer(signal.ITIMER_REAL, 0)
assert caught, "the timer never fired"
print(twice)
"""


def test_a_signal_caught_around_the_fork_is_handled_in_the_parent_only() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]


def test_a_second_thread_is_seen() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert not single_threaded()
    finally:
        release.set()
        thread.join()


# Workers import random themselves (the zygote has not), so this holds with or without the
# reseed in fork; it guards what a tenant sees.
DRAW = """
import random
from workers import WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def draw(self):
        return random.random()
"""


async def test_no_two_workers_draw_the_same_random_numbers(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        draws = set()
        for _ in range(4):
            stub = loader.get(None, lambda: WorkerCode(main_module="m.py", modules={"m.py": DRAW}))
            draws.add(await stub.get_entrypoint().draw())
            await stub.aclose()
    assert len(draws) == 4
