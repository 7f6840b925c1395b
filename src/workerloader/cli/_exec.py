"""``workerloader exec CODE|-``: run a snippet once in a sandboxed worker, print what it gave."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._common import data_dir_option, insecure_option, namespace_option, option


@click.command("exec")
@click.argument("code")
@data_dir_option
@option(
    "--timeout-ms",
    default=30_000,
    type=click.IntRange(1000, 300_000),  # as POST /execute's timeout_ms
    show_default=True,
    envvar="WORKERLOADER_EXEC_TIMEOUT_MS",
    help="Wall time of the snippet, ms.",
)
@option(
    "--cpu-ms",
    default=1000,
    type=click.IntRange(1, 60_000),  # as POST /execute's limits
    show_default=True,
    envvar="WORKERLOADER_EXEC_CPU_MS",
    help="CPU time of the snippet, ms.",
)
@option(
    "--memory-mb",
    default=128,
    type=click.IntRange(16, 4096),
    show_default=True,
    envvar="WORKERLOADER_EXEC_MEMORY_MB",
    help="Memory of the snippet's worker, MiB.",
)
@namespace_option
@insecure_option
def exec_(
    code: str,
    data_dir: Path,
    timeout_ms: int,
    cpu_ms: int,
    memory_mb: int,
    namespace: str,
    insecure: bool,
) -> None:
    """Run CODE (or standard input, with -) as the body of an async function, with env, sdk,
    db, kv, sql, blobs, ai, api and context in scope (the sdk of --namespace); print the
    result as JSON (stdout) and the captured logs (stderr). Exit status 1 if the code failed,
    2 if it ran out of wall time."""
    from .. import Limits, Loader
    from ..rpc._loop import run
    from ..server._execute import execute

    source = sys.stdin.read() if code == "-" else code

    async def main() -> tuple[int, dict[str, object]]:
        async with Loader(data_dir, pool_size=1, insecure=insecure) as loader:
            limits = Limits(cpu_ms=cpu_ms, memory_mb=memory_mb, wall_ms=timeout_ms)
            outcome = await execute(loader, source, limits, loader.sdk(namespace))
        return outcome.status, outcome.body

    status, body = run(main())
    logs = body.get("logs")
    for line in logs if isinstance(logs, list) else []:
        click.echo(f"[log] {line}", err=True)
    if body.get("ok"):
        click.echo(json.dumps(body.get("result")))
        return
    error = body.get("error") or {}
    assert isinstance(error, dict)
    click.echo(error.get("traceback") or f"{error.get('type')}: {error.get('message')}", err=True)
    sys.exit(1 if status != 504 else 2)
