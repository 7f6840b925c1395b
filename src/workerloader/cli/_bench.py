"""``workerloader bench NAME``: run a benchmark and print its figures beside their baselines."""

from __future__ import annotations

import click

from ..bench import (
    print_figures,
    run_bindings_bench,
    run_http_bench,
    run_loader_bench,
    run_rpc_bench,
)


@click.group()
def bench() -> None:
    """Measure workerloader against baselines run in the same process."""


@bench.command("rpc")
@click.option("--calls", default=5000, show_default=True, help="Round trips to time.")
@click.option("--pipelined", default=20000, show_default=True, help="Pipelined calls to time.")
def bench_rpc(calls: int, pipelined: int) -> None:
    """Call round trip and pipelined calls/s between two processes over a socketpair."""
    print_figures("RPC between two processes (Unix socketpair)", run_rpc_bench(calls, pipelined))


@bench.command("loader")
@click.option("--live", default=1000, show_default=True, help="Live workers for the memory figure.")
def bench_loader(live: int) -> None:
    """Cold and warm calls, new workers/s and memory per idle worker, in the real sandbox."""
    print_figures("Loader: sandboxed workers", run_loader_bench(live=live))


@bench.command("bindings")
def bench_bindings() -> None:
    """A binding call from a worker to the host, and document throughput."""
    print_figures("Bindings: calls from a sandboxed worker", run_bindings_bench())


@bench.command("http")
def bench_http() -> None:
    """The service end to end beside Cloudflare's workerd (installed from npm on first use)."""
    print_figures("HTTP: workerloader serve vs workerd serve --experimental", run_http_bench())
