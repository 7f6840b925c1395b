"""``workerloader bench NAME``: run a benchmark and print its figures beside their baselines."""

from __future__ import annotations

import click

from ..bench import print_figures, run_rpc_bench


@click.group()
def bench() -> None:
    """Measure workerloader against baselines run in the same process."""


@bench.command("rpc")
@click.option("--calls", default=5000, show_default=True, help="Round trips to time.")
@click.option("--pipelined", default=20000, show_default=True, help="Pipelined calls to time.")
def bench_rpc(calls: int, pipelined: int) -> None:
    """Call round trip and pipelined calls/s between two processes over a socketpair."""
    print_figures("RPC between two processes (Unix socketpair)", run_rpc_bench(calls, pipelined))
