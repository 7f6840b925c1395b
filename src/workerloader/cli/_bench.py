"""``workerloader bench NAME``: run a benchmark and print its figures beside their baselines."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import click
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner

from ..bench import (
    Figure,
    print_figures,
    run_bindings_bench,
    run_http_bench,
    run_loader_bench,
    run_rpc_bench,
)
from ._common import option, sandbox_python_option


def _measured(what: str, measure: Callable[[], list[Figure]]) -> list[Figure]:
    """``measure()``, under a status line saying ``what`` runs (a bench takes seconds to
    minutes and prints nothing until its table), cleared when it ends. It goes to stderr, and
    only to a terminal (rich draws nothing elsewhere), so stdout holds the table alone.

    Drawn once, not animated: rich animates from a thread, which would wake inside the
    measured process a dozen times a second and be running when the benches fork."""
    status = Spinner("dots", f"measuring {what}…")
    with Live(status, console=Console(stderr=True), auto_refresh=False, transient=True):
        return measure()


@click.group()
def bench() -> None:
    """Measure workerloader against baselines run in the same process."""


@bench.command("rpc")
@option(
    "--calls",
    default=5000,
    show_default=True,
    envvar="WORKERLOADER_BENCH_CALLS",
    help="Round trips to time.",
)
@option(
    "--pipelined",
    default=20000,
    show_default=True,
    envvar="WORKERLOADER_BENCH_PIPELINED",
    help="Pipelined calls to time.",
)
def bench_rpc(calls: int, pipelined: int) -> None:
    """Call round trip and pipelined calls/s between two processes over a socketpair."""
    figures = _measured("RPC round trips", lambda: run_rpc_bench(calls, pipelined))
    print_figures("RPC between two processes (Unix socketpair)", figures)


@bench.command("loader")
@option(
    "--live",
    default=1000,
    show_default=True,
    envvar="WORKERLOADER_BENCH_LIVE",
    help="Live workers for the memory figure.",
)
def bench_loader(live: int) -> None:
    """Cold and warm calls, new workers/s and memory per idle worker, in the real sandbox."""
    figures = _measured("sandboxed workers", lambda: run_loader_bench(live=live))
    print_figures("Loader: sandboxed workers", figures)


@bench.command("bindings")
def bench_bindings() -> None:
    """A binding call from a worker to the host, and document throughput."""
    figures = _measured("binding calls", run_bindings_bench)
    print_figures("Bindings: calls from a sandboxed worker", figures)


@bench.command("http")
@option(
    "--service-python",
    default=None,
    envvar="WORKERLOADER_BENCH_SERVICE_PYTHON",
    help="The interpreter the service runs on (it must import this workerloader). "
    "[default: this one]",
)
@sandbox_python_option
def bench_http(service_python: str | None, sandbox_python: str | None) -> None:
    """The service end to end beside Cloudflare's workerd (installed from npm on first use).
    ``./scripts/bench http`` runs the service as ``./scripts/serve`` does."""
    figures = _measured(
        "the service and workerd over HTTP",
        lambda: run_http_bench(service_python=service_python, sandbox_python=sandbox_python),
    )
    service = service_python or sys.executable
    caption = (
        f"service on Python {_version_of(service)} ({service}), workers on Python "
        f"{_version_of(sandbox_python or service)}"
    )
    print_figures(
        "HTTP: workerloader serve vs workerd serve --experimental", figures, caption=caption
    )


def _version_of(python: str) -> str:
    """The version of the interpreter ``python`` (as ``3.12.1``)."""
    done = subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()
