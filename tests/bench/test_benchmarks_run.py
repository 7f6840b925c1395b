"""The benchmarks run end to end (tiny sizes): a broken bench is caught here, not when someone
needs its figures. Tests do not time anything; the figures are only checked to exist."""

from __future__ import annotations

from workerloader.bench import run_bindings_bench, run_loader_bench, run_rpc_bench


def test_the_rpc_bench_runs() -> None:
    figures = run_rpc_bench(calls=50, pipelined=500)
    assert {f.name for f in figures} >= {"round trip p50", "pipelined calls"}
    assert all(f.value > 0 for f in figures)


def test_the_bindings_bench_runs() -> None:
    figures = run_bindings_bench(n=100)
    assert figures[0].name == "kv.get from a worker, p50"
    assert all(f.value > 0 for f in figures)


def test_the_loader_bench_runs() -> None:
    figures = run_loader_bench(cold=4, warm=20, rate=8, live=5)
    answering = figures[-1]
    assert answering.value == 5
    assert all(f.value > 0 for f in figures)
