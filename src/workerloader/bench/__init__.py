"""Benchmarks, each printing its figures beside a baseline measured in the same run.

Run them with ``workerloader bench NAME`` or ``python -m workerloader.bench NAME``.
"""

from ._bindings import run_bindings_bench as run_bindings_bench
from ._http import run_http_bench as run_http_bench
from ._loader import run_loader_bench as run_loader_bench
from ._report import Figure as Figure
from ._report import print_figures as print_figures
from ._rpc import run_rpc_bench as run_rpc_bench

__all__ = [
    "Figure",
    "print_figures",
    "run_bindings_bench",
    "run_http_bench",
    "run_loader_bench",
    "run_rpc_bench",
]
