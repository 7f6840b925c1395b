"""The ``workerloader`` command: a thin noun-verb CLI, one module per noun."""

from ._main import main as main

__all__ = ["main"]
