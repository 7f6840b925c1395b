"""``workerloader workers list|put|delete``: the workers the service stores (in the data dir)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from .._errors import WorkerloaderError, WorkerLoadError
from ..bindings import HttpGateway
from ..server._store import ServiceStore
from ..server._workers import (
    _ID,
    BadDefinition,
    WorkerDefinition,
    WorkerLimits,
    check_definition,
)
from ._common import (
    announce_made_data_dir,
    binding_option,
    check_env_and_bindings,
    data_dir_option,
    env_option,
    existing_store,
    insecure_option,
    namespace_option,
    option,
    sandbox_python_option,
)

_F = TypeVar("_F", bound=Callable[..., Any])


def read_worker_dir(path: Path) -> dict[str, object]:
    """A worker definition from a directory: ``*.py`` are modules, ``*.json`` JSON modules,
    ``*.txt`` text, anything else data; ``main.py`` is the main module. Raises
    WorkerLoadError (naming the file) for a directory with no ``main.py``, a ``.json`` file
    that is not JSON, or source or text that is not UTF-8: to ``dev`` that is the code
    failing to load, like a syntax error."""
    modules: dict[str, object] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        if "__pycache__" in name or name.startswith("."):
            continue
        try:
            if file.suffix == ".py":
                modules[name] = file.read_text()
            elif file.suffix == ".json":
                modules[name] = {"json": json.loads(file.read_text())}
            elif file.suffix == ".txt":
                modules[name] = {"text": file.read_text()}
            else:
                modules[name] = {"data_base64": base64.b64encode(file.read_bytes()).decode()}
        except json.JSONDecodeError as exc:
            raise WorkerLoadError(
                f"JSONDecodeError: {exc.msg}", name, exc.lineno, "JSONDecodeError"
            ) from None
        except UnicodeDecodeError as exc:
            raise WorkerLoadError(
                f"UnicodeDecodeError: {exc}", name, None, "UnicodeDecodeError"
            ) from None
    if "main.py" not in modules:
        raise WorkerLoadError(
            f"FileNotFoundError: {path} has no main.py", "main.py", None, "FileNotFoundError"
        )
    return {"main_module": "main.py", "modules": modules}


def _limit(name: str, unit: str) -> Callable[[_F], _F]:
    """``--NAME`` for the stored limit ``name``; unset, the definition's default applies."""
    field = WorkerLimits.model_fields[name]
    return option(
        f"--{name.replace('_', '-')}",
        type=int,
        default=None,
        envvar=f"WORKERLOADER_WORKERS_{name.upper()}",
        help=f"{unit} [default: {field.default}]",
    )


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    )


@click.group()
def workers() -> None:
    """List, store and delete the service's workers."""


@workers.command("list")
@namespace_option
@data_dir_option
def list_workers(namespace: str, data_dir: Path) -> None:
    """The workers of a namespace."""
    table = Table()
    for column in ("id", "version", "updated"):
        table.add_column(column)
    for worker in existing_store(data_dir).list_workers(namespace):
        updated = dt.datetime.fromtimestamp(worker["updated"]).isoformat(timespec="seconds")
        table.add_row(worker["id"], str(worker["version"]), updated)
    Console().print(table)


# The list options' variables hold several items separated by whitespace (click's rule for
# `multiple`): WORKERLOADER_BINDING="SDK=sdk KV=kv".
@workers.command("put")
@click.argument("worker_id")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@env_option("WORKERLOADER_ENV")
@binding_option("WORKERLOADER_BINDING")
@_limit("cpu_ms", "CPU time per call, ms.")
@_limit("memory_mb", "Memory, MiB.")
@_limit("wall_ms", "Wall time per call, ms.")
@_limit("subrequests", "Binding calls per call.")
@namespace_option
@data_dir_option
@insecure_option
@sandbox_python_option
def put_worker(
    worker_id: str,
    path: Path,
    env: dict[str, object],
    bindings: dict[str, dict[str, object]],
    namespace: str,
    data_dir: Path,
    insecure: bool,
    sandbox_python: str | None,
    **limits: int | None,
) -> None:
    """Store the worker in directory PATH as WORKER_ID, with its env data, bindings and
    limits (the definition ``PUT /workers/{id}`` takes). It is loaded first: a worker that
    fails to load is not stored, and its error is printed on one line."""
    from .. import Loader
    from ..rpc._loop import run
    from ..server._store import Caller
    from ..server._workers import _code

    if not _ID.fullmatch(worker_id):  # the service's rule: any other id is unreachable
        raise click.BadParameter(f"{worker_id!r} is not a worker id", param_hint="WORKER_ID")
    check_env_and_bindings(env, bindings)
    try:
        definition = WorkerDefinition.model_validate(
            {
                **read_worker_dir(path),
                "env": env,
                "bindings": bindings,
                "limits": {name: value for name, value in limits.items() if value is not None},
            }
        )
        check_definition(definition)  # what the service refuses, this refuses too
    except ValidationError as exc:
        raise click.ClickException(_one_line(exc)) from None
    except (WorkerLoadError, BadDefinition) as exc:
        raise click.ClickException(f"{worker_id} not stored: {exc}") from None

    fresh = not data_dir.exists()

    async def check() -> None:
        async with Loader(
            data_dir, pool_size=1, insecure=insecure, sandbox_python=sandbox_python
        ) as loader:
            caller = Caller(None, namespace, False)
            # An "api" binding is the serving service's HTTP gateway, which its config makes:
            # a gateway that allows nothing stands in, so that the code loads as it will there.
            code = _code(loader, caller, definition, HttpGateway([]))
            stub = await loader.load(code)
            await stub.aclose()

    try:
        run(check())
    except WorkerLoadError as exc:  # its text is "file:line: Type: message"
        raise click.ClickException(f"{worker_id} not stored: {exc}") from None
    except WorkerloaderError as exc:  # a limit while loading, no sandbox, ...
        raise click.ClickException(f"{worker_id} not stored: {type(exc).__name__}: {exc}") from None
    version = ServiceStore(data_dir).put_worker(namespace, worker_id, definition.model_dump())
    click.echo(f"stored {worker_id} version {version}")
    if fresh:
        announce_made_data_dir(data_dir)


@workers.command("delete")
@click.argument("worker_id")
@namespace_option
@data_dir_option
def delete_worker(worker_id: str, namespace: str, data_dir: Path) -> None:
    """Delete a stored worker."""
    if not existing_store(data_dir).delete_worker(namespace, worker_id):
        raise click.ClickException(f"no worker {worker_id!r} in namespace {namespace!r}")
    click.echo(f"deleted {worker_id}")
