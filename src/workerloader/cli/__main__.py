"""``python -m workerloader.cli`` is the ``workerloader`` command."""

from ._main import main

main(prog_name="workerloader")
