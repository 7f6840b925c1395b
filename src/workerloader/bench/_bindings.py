"""Bindings benchmark: a binding call from a sandboxed worker to the host, and document
throughput, beside raw ``sqlite3`` calls in the host measured in the same run."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path

from ..loader import Limits, Loader, WorkerCode
from ..rpc._loop import run as run_loop
from ._report import Figure, percentile

__all__ = ["run_bindings_bench"]

_MAIN = """
import time
from workers import WorkerEntrypoint, sdk

class Bench(WorkerEntrypoint):
    async def kv_get(self, n):
        await sdk.kv.put("k", "v")
        samples = []
        for _ in range(n):
            start = time.perf_counter_ns()
            await sdk.kv.get("k")
            samples.append((time.perf_counter_ns() - start) / 1000)
        return samples

    async def db_create(self, n):
        start = time.perf_counter()
        for i in range(n):
            await sdk.db.create("items", {"name": f"item {i}", "n": i})
        return n / (time.perf_counter() - start)

    async def db_list(self, n):
        start = time.perf_counter()
        for _ in range(n):
            await sdk.db.list("items", limit=20)
        return n / (time.perf_counter() - start)
"""


def _raw_sqlite(path: Path, n: int) -> tuple[list[float], float, float]:
    """The same operations as plain sqlite3 calls in this process."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE kv (ns TEXT, key TEXT, value BLOB, PRIMARY KEY (ns, key))")
    conn.execute("CREATE TABLE docs (ns TEXT, c TEXT, id TEXT, body TEXT, PRIMARY KEY (ns, c, id))")
    conn.execute("INSERT INTO kv VALUES ('b', 'k', 'v')")
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        conn.execute("SELECT value FROM kv WHERE ns = 'b' AND key = 'k'").fetchone()
        samples.append((time.perf_counter_ns() - start) / 1000)
    start_s = time.perf_counter()
    for i in range(n // 5):
        body = json.dumps({"name": f"item {i}", "n": i})
        conn.execute("INSERT INTO docs VALUES ('b', 'items', ?, ?)", (str(i), body))
    create_rate = (n // 5) / (time.perf_counter() - start_s)
    start_s = time.perf_counter()
    for _ in range(n // 5):
        rows = conn.execute("SELECT id, body FROM docs WHERE ns = 'b' LIMIT 20").fetchall()
        [json.loads(b) for _, b in rows]
    list_rate = (n // 5) / (time.perf_counter() - start_s)
    conn.close()
    return samples, create_rate, list_rate


async def _ours(data_dir: Path, n: int) -> tuple[list[float], float, float]:
    async with Loader(data_dir, pool_size=2) as loader:
        code = WorkerCode(
            main_module="main.py",
            modules={"main.py": _MAIN},
            env={"SDK": loader.sdk("bench")},
            # One call makes thousands of binding calls here, on purpose.
            limits=Limits(cpu_ms=60_000, wall_ms=120_000, subrequests=10 * n),
        )
        bench = loader.get("bench", lambda: code).get_entrypoint("Bench")
        samples: list[float] = await bench.kv_get(n)
        create_rate: float = await bench.db_create(n // 5)
        list_rate: float = await bench.db_list(n // 5)
    return samples, create_rate, list_rate


def run_bindings_bench(n: int = 5000) -> list[Figure]:
    """Binding round trip (``kv.get`` from a worker), ``db.create`` and ``db.list`` rates."""
    with tempfile.TemporaryDirectory() as tmp:
        raw_samples, raw_create, raw_list = _raw_sqlite(Path(tmp) / "raw.sqlite3", n)
        samples, create_rate, list_rate = run_loop(_ours(Path(tmp) / "data", n))
    raw = "sqlite3 in the host"
    return [
        Figure(
            "kv.get from a worker, p50",
            percentile(samples, 0.5),
            "µs",
            percentile(raw_samples, 0.5),
            raw,
            target=100,
        ),
        Figure(
            "kv.get from a worker, p99",
            percentile(samples, 0.99),
            "µs",
            percentile(raw_samples, 0.99),
            raw,
        ),
        Figure(
            "kv.get calls/s from one worker",
            1e6 / (sum(samples) / len(samples)),
            "/s",
            1e6 / (sum(raw_samples) / len(raw_samples)),
            raw,
            higher_is_better=True,
        ),
        Figure(
            "db.create from a worker", create_rate, "/s", raw_create, raw, higher_is_better=True
        ),
        Figure(
            "db.list (20 docs) from a worker", list_rate, "/s", raw_list, raw, higher_is_better=True
        ),
    ]
