"""``MemoryCgroups``: a worker's memory cgroup is kept for the next worker once it is empty.

Real cgroups (v1 or v2, whichever the host can write) holding real processes; skipped where
this machine has no writable memory hierarchy.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workerloader.sandbox._cgroup import MemoryCgroups, WorkerCgroup

Spawn = Callable[..., subprocess.Popen[bytes]]

# Waits for a line on stdin (sent once it is in its cgroup), then touches 256 MiB.
HOG = """
import sys
sys.stdin.readline()
hog = b"x" * (256 << 20)
print("survived", len(hog))
"""


@pytest.fixture
def cgroups() -> Iterator[MemoryCgroups]:
    found = MemoryCgroups.detect()
    if found is None:
        pytest.skip("no writable memory cgroup hierarchy here")
    try:
        yield found
    finally:
        found.remove()
    assert not found.root.exists()


@pytest.fixture
def spawn(cgroups: MemoryCgroups) -> Iterator[Spawn]:
    """Start processes (``sleep 30`` by default); any still running are killed and reaped
    before the cgroups are removed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, piped: bool = False) -> subprocess.Popen[bytes]:
        pipe = subprocess.PIPE if piped else None
        process = subprocess.Popen(list(argv) or ["sleep", "30"], stdin=pipe, stdout=pipe)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()
            process.wait()
            if process.stdin is not None:
                process.stdin.close()
            if process.stdout is not None:
                process.stdout.close()


def limit_file(cgroups: MemoryCgroups, cgroup: WorkerCgroup) -> Path:
    return cgroup.path / ("memory.max" if cgroups.v2 else "memory.limit_in_bytes")


def pids_in(cgroup: WorkerCgroup) -> list[int]:
    return [int(pid) for pid in (cgroup.path / "cgroup.procs").read_text().split()]


def kernel_oom_kills(cgroups: MemoryCgroups, cgroup: WorkerCgroup) -> int:
    """The kernel's own OOM-kill counter for the cgroup, read without the code under test."""
    name = "memory.events" if cgroups.v2 else "memory.oom_control"
    for line in (cgroup.path / name).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    raise AssertionError(f"no oom_kill counter in {name}")


def kill_and_reap(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    assert process.wait() == -signal.SIGKILL


def attach(cgroups: MemoryCgroups, pid: int, limit: int) -> WorkerCgroup:
    cgroup = cgroups.attach(pid, limit)
    assert cgroup is not None, "attach failed"
    assert cgroup.path.parent == cgroups.root
    assert pids_in(cgroup) == [pid]
    assert int(limit_file(cgroups, cgroup).read_text()) == limit
    return cgroup


def test_an_empty_cgroup_is_reused_with_the_new_limit(cgroups: MemoryCgroups, spawn: Spawn) -> None:
    first = spawn()
    cgroup = attach(cgroups, first.pid, 64 << 20)
    assert not cgroup.oom_killed()
    kill_and_reap(first)
    assert pids_in(cgroup) == []
    cgroup.release()
    assert cgroup.path.is_dir()  # kept, not removed

    second = spawn()
    again = attach(cgroups, second.pid, 48 << 20)
    assert again.path == cgroup.path
    assert not again.oom_killed()
    assert second.poll() is None  # moving it did not hurt it
    kill_and_reap(second)
    again.release()


def test_a_kept_cgroup_removed_meanwhile_is_made_again(
    cgroups: MemoryCgroups, spawn: Spawn
) -> None:
    first = spawn()
    cgroup = attach(cgroups, first.pid, 64 << 20)
    kill_and_reap(first)
    cgroup.release()
    cgroup.path.rmdir()  # someone else's cleanup
    second = spawn()
    again = attach(cgroups, second.pid, 64 << 20)  # the same limit: written again all the same
    assert again.path == cgroup.path
    assert not again.oom_killed()


def test_a_cgroup_is_reused_once_its_process_has_exited_before_it_is_reaped(
    cgroups: MemoryCgroups, spawn: Spawn
) -> None:
    """The host's own order: it waits for the worker's pidfd to turn readable (exited), and
    its parent (the zygote) reaps it whenever it does."""
    first = spawn()
    cgroup = attach(cgroups, first.pid, 64 << 20)
    pidfd = os.pidfd_open(first.pid)
    try:
        first.send_signal(signal.SIGKILL)
        readable, _, _ = select.select([pidfd], [], [])
        assert readable == [pidfd]
        assert first.returncode is None  # a zombie: exited, not reaped yet
        cgroup.release()
    finally:
        os.close(pidfd)
    second = spawn()
    assert attach(cgroups, second.pid, 64 << 20).path == cgroup.path


def test_a_cgroup_with_a_live_process_is_not_reused(cgroups: MemoryCgroups, spawn: Spawn) -> None:
    alive = spawn()
    busy = attach(cgroups, alive.pid, 64 << 20)
    busy.release()  # too early: its process still runs
    assert pids_in(busy) == [alive.pid]  # neither removed nor emptied

    other = spawn()
    fresh = attach(cgroups, other.pid, 32 << 20)
    assert fresh.path != busy.path
    assert pids_in(busy) == [alive.pid]
    assert int(limit_file(cgroups, busy).read_text()) == 64 << 20  # left alone

    # Releasing it again once its process is gone makes it reusable after all.
    kill_and_reap(alive)
    busy.release()
    third = spawn()
    assert attach(cgroups, third.pid, 16 << 20).path == busy.path


def test_attaching_a_process_that_is_gone_fails_and_the_cgroup_is_not_kept(
    cgroups: MemoryCgroups, spawn: Spawn
) -> None:
    gone = spawn()
    kill_and_reap(gone)
    assert cgroups.attach(gone.pid, 64 << 20) is None
    assert list(cgroups.root.glob("w*")) == []
    live = spawn()
    attach(cgroups, live.pid, 64 << 20)


def _swap_in_use() -> bool:
    return len(Path("/proc/swaps").read_text().splitlines()) > 1


def test_an_oom_kill_is_reported_for_its_worker_only(cgroups: MemoryCgroups, spawn: Spawn) -> None:
    if not cgroups.v2 and _swap_in_use():
        pytest.skip("cgroup v1 caps RAM only: with swap on, the hog would swap, not die")
    hog = spawn(sys.executable, "-c", HOG, piped=True)
    cgroup = attach(cgroups, hog.pid, 64 << 20)
    before = kernel_oom_kills(cgroups, cgroup)
    assert not cgroup.oom_killed()
    assert hog.stdin is not None
    hog.stdin.write(b"go\n")
    hog.stdin.close()
    assert hog.wait() == -signal.SIGKILL
    assert hog.stdout is not None
    assert hog.stdout.read() == b""  # it never got past the allocation
    assert kernel_oom_kills(cgroups, cgroup) > before
    assert cgroup.oom_killed()
    cgroup.release()

    # The next occupant starts from the counter as it is: the earlier kill is not its own.
    heir = spawn()
    again = attach(cgroups, heir.pid, 64 << 20)
    assert again.path == cgroup.path
    assert kernel_oom_kills(cgroups, again) > 0
    assert not again.oom_killed()
    kill_and_reap(heir)
    assert not again.oom_killed()
