"""``workerloader workers list|put|delete``: the workers the service stores (in the data dir)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..server._store import ServiceStore
from ._common import data_dir_option

_namespace = click.option("--namespace", default="default", show_default=True)


def read_worker_dir(path: Path) -> dict[str, object]:
    """A worker definition from a directory: ``*.py`` are modules, ``*.json`` JSON modules,
    ``*.txt`` text, anything else data; ``main.py`` is the main module."""
    modules: dict[str, object] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        if "__pycache__" in name or name.startswith("."):
            continue
        if file.suffix == ".py":
            modules[name] = file.read_text()
        elif file.suffix == ".json":
            modules[name] = {"json": json.loads(file.read_text())}
        elif file.suffix == ".txt":
            modules[name] = {"text": file.read_text()}
        else:
            modules[name] = {"data_base64": base64.b64encode(file.read_bytes()).decode()}
    if "main.py" not in modules:
        raise click.ClickException(f"{path} has no main.py")
    return {"main_module": "main.py", "modules": modules}


@click.group()
def workers() -> None:
    """List, store and delete the service's workers."""


@workers.command("list")
@_namespace
@data_dir_option
def list_workers(namespace: str, data_dir: Path) -> None:
    """The workers of a namespace."""
    table = Table()
    for column in ("id", "version", "updated"):
        table.add_column(column)
    for worker in ServiceStore(data_dir).list_workers(namespace):
        updated = dt.datetime.fromtimestamp(worker["updated"]).isoformat(timespec="seconds")
        table.add_row(worker["id"], str(worker["version"]), updated)
    Console().print(table)


@workers.command("put")
@click.argument("worker_id")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_namespace
@data_dir_option
def put_worker(worker_id: str, path: Path, namespace: str, data_dir: Path) -> None:
    """Store the worker in directory PATH as WORKER_ID (checked for load errors first)."""
    from .. import Loader
    from ..rpc._loop import run
    from ..server._store import Caller
    from ..server._workers import WorkerDefinition, _code

    definition = WorkerDefinition.model_validate(read_worker_dir(path))

    async def check() -> None:
        async with Loader(data_dir, pool_size=1) as loader:
            caller = Caller(None, namespace, False)
            stub = await loader.load(_code(loader, caller, definition))
            await stub.aclose()

    run(check())
    version = ServiceStore(data_dir).put_worker(namespace, worker_id, definition.model_dump())
    click.echo(f"stored {worker_id} version {version}")


@workers.command("delete")
@click.argument("worker_id")
@_namespace
@data_dir_option
def delete_worker(worker_id: str, namespace: str, data_dir: Path) -> None:
    """Delete a stored worker."""
    if not ServiceStore(data_dir).delete_worker(namespace, worker_id):
        raise click.ClickException(f"no worker {worker_id!r} in namespace {namespace!r}")
    click.echo(f"deleted {worker_id}")
