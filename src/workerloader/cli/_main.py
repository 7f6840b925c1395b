"""The root command group; each noun lives in its own module."""

from __future__ import annotations

import click

from .. import __version__
from ._bench import bench
from ._keys import keys
from ._serve import serve


@click.group()
@click.version_option(__version__, prog_name="workerloader")
def main() -> None:
    """Run untrusted Python in sandboxed workers that reach the platform through capabilities."""


main.add_command(bench)
main.add_command(keys)
main.add_command(serve)
