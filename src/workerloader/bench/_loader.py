"""Loader benchmark: cold and warm calls, new workers/s, memory per idle worker.

Baselines measured in the same run: ``subprocess.run([python, "-c", code])`` per call, and an
unconfined ``os.fork()`` per call.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

from ..loader import Loader, WorkerCode
from ..rpc._loop import run as run_loop
from ._report import Figure, percentile

__all__ = ["run_loader_bench"]

_MAIN = """
from workers import WorkerEntrypoint

class Calc(WorkerEntrypoint):
    async def add(self, a, b):
        return a + b
"""


def _code() -> WorkerCode:
    return WorkerCode(main_module="main.py", modules={"main.py": _MAIN})


def _subprocess_ms(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "print(1 + 2)"], capture_output=True, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _fork_ms(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, str(1 + 2).encode())
            os._exit(0)
        os.close(write)
        os.read(read, 16)
        os.close(read)
        os.waitpid(pid, 0)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def _cold_ms(loader: Loader, runs: int, pause_s: float) -> list[float]:
    """Cold calls one after another; ``pause_s`` between them lets the pool refill."""
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        stub = loader.get(f"cold-{i}", _code)
        assert await stub.get_entrypoint("Calc").add(1, 2) == 3
        samples.append((time.perf_counter() - start) * 1000)
        await loader.evict(f"cold-{i}")
        await asyncio.sleep(pause_s)
    return samples


async def _warm_us(loader: Loader, runs: int) -> list[float]:
    calc = loader.get("warm", _code).get_entrypoint("Calc")
    for _ in range(200):
        await calc.add(1, 2)
    samples = []
    for i in range(runs):
        start = time.perf_counter_ns()
        await calc.add(i, 1)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


async def _new_per_s(loader: Loader, total: int, concurrency: int) -> float:
    counter = iter(range(total))

    async def one_lane() -> None:
        for i in counter:
            stub = loader.get(f"rate-{i}", _code)
            await stub.get_entrypoint("Calc").add(1, 2)
            await loader.evict(f"rate-{i}")

    start = time.perf_counter()
    await asyncio.gather(*(one_lane() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


async def _uss_per_worker_mb(loader: Loader, live: int) -> tuple[float, int]:
    stubs = [loader.get(f"live-{i}", _code) for i in range(live)]
    for stub in stubs:
        await stub.get_entrypoint("Calc").add(1, 2)
    total = 0
    for stub in stubs:
        worker = stub._worker
        assert worker is not None
        total += psutil.Process(worker.process.pid).memory_full_info().uss
    answered = sum([await s.get_entrypoint("Calc").add(1, 1) == 2 for s in stubs])
    return total / live / (1 << 20), answered


@dataclass
class _Results:
    cold: list[float]
    paced: list[float]
    warm: list[float]
    rate: float
    uss_mb: float
    answered: int


async def _measure(cold: int, warm: int, rate: int, live: int) -> _Results:
    with tempfile.TemporaryDirectory() as data_dir:
        async with Loader(data_dir, pool_size=16, max_workers=live + 10) as loader:
            await asyncio.sleep(0.5)  # let the zygote fill its pool
            cold_samples = await _cold_ms(loader, cold, pause_s=0)
            paced_samples = await _cold_ms(loader, max(cold // 4, 10), pause_s=0.05)
            await asyncio.sleep(0.5)  # a quiet machine for warm calls: the pool has refilled
            warm_samples = await _warm_us(loader, warm)
            rate_value = await _new_per_s(loader, rate, concurrency=4)
            uss, answered = await _uss_per_worker_mb(loader, live)
    return _Results(cold_samples, paced_samples, warm_samples, rate_value, uss, answered)


def run_loader_bench(
    cold: int = 200, warm: int = 2000, rate: int = 600, live: int = 1000
) -> list[Figure]:
    """Measure the figures of issue "Sandboxed workers and the Loader"."""
    sub = percentile(_subprocess_ms(20), 0.5)
    fork = percentile(_fork_ms(200), 0.5)
    ours = run_loop(_measure(cold, warm, rate, live))  # the loop the service runs on
    sub_name, fork_name = "subprocess.run python -c", "os.fork per call"
    return [
        Figure(
            "cold call p50 (get + first call, back to back)",
            percentile(ours.cold, 0.5),
            "ms",
            sub,
            sub_name,
            target=1.5,
        ),
        Figure(
            "cold call p50 (pool refilled between calls)",
            percentile(ours.paced, 0.5),
            "ms",
            sub,
            sub_name,
            target=1.5,
        ),
        Figure(
            "cold call p50 vs an unconfined fork", percentile(ours.cold, 0.5), "ms", fork, fork_name
        ),
        Figure(
            "warm call p50", percentile(ours.warm, 0.5), "µs", fork * 1000, fork_name, target=150
        ),
        Figure(
            "new workers/s (4 in flight)",
            ours.rate,
            "/s",
            1000 / sub,
            "subprocess.run",
            target=300,
            higher_is_better=True,
        ),
        Figure(f"USS per idle worker ({live} live)", ours.uss_mb, "MB", target=1.5),
        Figure(
            f"live workers answering (of {live})",
            float(ours.answered),
            "",
            target=live,
            higher_is_better=True,
        ),
    ]
