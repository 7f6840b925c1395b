"""``workerloader logs tail``: the request log, live."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import click

from ._common import data_dir_option, existing_store, namespace_option, option, shown


@click.group()
def logs() -> None:
    """Read the service's request logs."""


@logs.command("tail")
@namespace_option
@option(
    "--follow/--no-follow",
    default=True,
    show_default=True,
    envvar="WORKERLOADER_LOGS_FOLLOW",
    help="Keep printing new records.",
)
@option(
    "--limit",
    default=20,
    type=click.IntRange(1, 1000),
    show_default=True,
    envvar="WORKERLOADER_LOGS_LIMIT",
    help="Records shown at start.",
)
@data_dir_option
def tail(namespace: str, follow: bool, limit: int, data_dir: Path) -> None:
    """Print the latest records of NAMESPACE, then new ones as they come (Ctrl-C stops)."""
    store = existing_store(data_dir)
    seen: set[str] = set()
    since: float | None = None
    first = True
    while True:
        records = store.logs(namespace, since=since, limit=limit if first else 1000)
        for record in reversed(records):
            if record["id"] in seen:
                continue
            seen.add(record["id"])
            since = record["time"]
            when = dt.datetime.fromtimestamp(record["time"]).isoformat(timespec="milliseconds")
            error = f" {shown(record['error_type'])}" if record["error_type"] else ""
            worker = f" {record['worker']}" if record["worker"] else ""
            cpu = f" cpu {record['cpu_ms']:.1f}ms" if record.get("cpu_ms") is not None else ""
            who = f" by {record['user_id']}" if record["user_id"] else ""
            click.echo(
                f"{when} {record['status']} {record['kind']}{worker} "
                f"{record['duration_ms']:.1f}ms{cpu}{error}{who}"
            )
            for line in record["logs"]:
                click.echo(f"    {shown(line)}")
        first = False
        if not follow:
            return
        time.sleep(0.5)
