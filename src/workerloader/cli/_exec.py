"""``workerloader exec CODE|-``: run a snippet once in a sandboxed worker, print what it gave."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..server._app import ExecuteLimits
from ._common import (
    announce_made_data_dir,
    config_option,
    data_dir_option,
    insecure_option,
    namespace_option,
    option,
    service_config,
    shown,
)

_F = TypeVar("_F", bound=Callable[..., Any])


def _limit(name: str, flag: str, unit: str) -> Callable[[_F], _F]:
    """``--FLAG`` for ``POST /execute``'s limit ``name``: its default and bounds, as the
    service takes them (``ExecuteLimits``)."""
    field = ExecuteLimits.model_fields[name]
    bounds = {k: getattr(m, k) for m in field.metadata for k in ("ge", "le") if hasattr(m, k)}
    return option(
        f"--{flag}",
        default=field.default,
        type=click.IntRange(bounds["ge"], bounds["le"]),
        show_default=True,
        envvar=f"WORKERLOADER_EXEC_{flag.replace('-', '_').upper()}",
        help=unit,
    )


@click.command("exec")
@click.argument("code")
@data_dir_option
@_limit("wall_ms", "timeout-ms", "Wall time of the snippet, ms.")
@_limit("cpu_ms", "cpu-ms", "CPU time of the snippet, ms.")
@_limit("memory_mb", "memory-mb", "Memory of the snippet's worker, MiB.")
@namespace_option
@config_option
@insecure_option
def exec_(
    code: str,
    data_dir: Path,
    timeout_ms: int,
    cpu_ms: int,
    memory_mb: int,
    namespace: str,
    config_path: Path | None,
    insecure: bool,
) -> None:
    """Run CODE (or standard input, with -) as the body of an async function, with env, sdk,
    db, kv, sql, blobs, ai, api and context in scope (the sdk of --namespace; ai and api as
    `serve` configures them, from --config or ./workerloader.toml); print the
    result as JSON (stdout) and the captured logs (stderr). Exit status 1 if the code failed,
    2 if it ran out of wall time."""
    from .. import Limits, Loader
    from ..rpc._loop import run
    from ..server._execute import execute

    source = sys.stdin.read() if code == "-" else code
    service = service_config(config_path)  # the service's AI, gateway and quota
    fresh = not data_dir.exists()

    async def main() -> tuple[int, dict[str, object]]:
        async with Loader(
            data_dir,
            pool_size=1,
            insecure=insecure,
            ai=service.ai,
            storage_quota_mb=service.storage_quota_mb,
            sandbox_python=service.sandbox_python,
        ) as loader:
            limits = Limits(cpu_ms=cpu_ms, memory_mb=memory_mb, wall_ms=timeout_ms)
            sdk = loader.sdk(namespace, api=service.api)
            outcome = await execute(loader, source, limits, sdk)
        return outcome.status, outcome.body

    status, body = run(main())
    if fresh:
        announce_made_data_dir(data_dir)
    logs = body.get("logs")
    for line in logs if isinstance(logs, list) else []:
        click.echo(f"[log] {shown(line)}", err=True)
    if body.get("ok"):
        click.echo(json.dumps(body.get("result")))
        return
    error = body.get("error") or {}
    assert isinstance(error, dict)
    detail = error.get("traceback") or f"{error.get('type')}: {error.get('message')}"
    click.echo(shown(detail, lines=True), err=True)
    sys.exit(1 if status != 504 else 2)
