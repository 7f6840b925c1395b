"""Options shared by several nouns: one definition, one environment variable."""

from __future__ import annotations

from pathlib import Path

import click

data_dir_option = click.option(
    "--data-dir",
    default=".workerloader",
    show_default=True,
    type=click.Path(path_type=Path),
    envvar="WORKERLOADER_DATA_DIR",
    help="Where KV, SQL, documents, blobs, keys, workers and logs live.",
)
