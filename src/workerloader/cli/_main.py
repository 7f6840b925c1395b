"""The root command group; each noun lives in its own module."""

from __future__ import annotations

import click

from .. import __version__
from ._bench import bench
from ._dev import dev
from ._exec import exec_
from ._keys import keys
from ._logs import logs
from ._serve import serve
from ._workers import workers


@click.group()
@click.version_option(__version__, prog_name="workerloader")
def main() -> None:
    """Run untrusted Python in sandboxed workers that reach the platform through capabilities."""


main.add_command(bench)
main.add_command(dev)
main.add_command(exec_)
main.add_command(keys)
main.add_command(logs)
main.add_command(serve)
main.add_command(workers)
