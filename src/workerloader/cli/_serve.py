"""``workerloader serve``: the HTTP service on uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import config_option, config_path_or_default, option, sandbox_python_option

# Every option defaults to None here: load_config tells a flag given (or its variable set,
# which click reads into the flag) from one absent, so the config file fills the rest. The
# variables are the ones load_config reads itself: declaring them here puts them in --help.


@click.command()
@config_option
@option("--host", default=None, envvar="WORKERLOADER_HOST", help="[default: 127.0.0.1]")
@option("--port", type=int, default=None, envvar="WORKERLOADER_PORT", help="[default: 8787]")
@option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    envvar="WORKERLOADER_DATA_DIR",
    help="Where KV, SQL, documents, blobs, keys, workers and logs live. [default: .workerloader]",
)
@option(
    "--insecure",
    is_flag=True,
    default=None,
    envvar="WORKERLOADER_INSECURE",
    help="Run workers unconfined where this machine has no sandbox.",
)
@option(
    "--pool-size",
    type=int,
    default=None,
    envvar="WORKERLOADER_POOL_SIZE",
    help="Pre-forked workers. [default: 32]",
)
@option(
    "--max-concurrent",
    type=int,
    default=None,
    envvar="WORKERLOADER_MAX_CONCURRENT",
    help="Executions in flight before 429. [default: 64]",
)
@option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    envvar="WORKERLOADER_MAX_CONNECTIONS",
    help="HTTP connections open at once; one more is answered 503 and closed. [default: 512]",
)
@option(
    "--log-retention-days",
    type=float,
    default=None,
    envvar="WORKERLOADER_LOG_RETENTION_DAYS",
    help="[default: 7]",
)
@option(
    "--log-max-mb",
    type=click.IntRange(min=1),
    default=None,
    envvar="WORKERLOADER_LOG_MAX_MB",
    help="Past this size of the service's database (its request log, mostly), the oldest "
    "request records are deleted. [default: 1024]",
)
@option(
    "--storage-quota-mb",
    type=click.IntRange(min=0),
    default=None,
    envvar="WORKERLOADER_STORAGE_QUOTA_MB",
    help="The most each namespace keeps in each of its stores (KV, documents, SQL, blobs); "
    "0: no quota. [default: 1024]",
)
@sandbox_python_option
@option(
    "--auth",
    is_flag=True,
    default=None,
    envvar="WORKERLOADER_AUTH",
    help="Require an API key on every request, even before any key exists.",
)
def serve(config_path: Path | None, **flags: object) -> None:
    """Serve /health, /execute, /workers and /logs. Options come from flags, then
    WORKERLOADER_* environment variables, then the config file (see docs/configuration.md)."""
    import uvicorn

    from ..rpc._loop import run
    from ..server import create_app
    from ..server._config import load_config
    from ..server._protocol import capped

    try:
        config, listen = load_config(config_path_or_default(config_path), flags)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    app = create_app(config)
    # No access log: every request is in the service's own request log (GET /logs), and
    # formatting a line per request costs the event loop that serves them all.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=listen.host,
            port=listen.port,
            http=capped(listen.max_connections),
            # No WebSockets (the service has no such route): uvicorn would otherwise upgrade a
            # connection wherever `websockets` is installed, swapping out the protocol that
            # counts it, whose place under max_connections would then never come free.
            ws="none",
            log_level="info",
            access_log=False,
        )
    )
    # On the spinning loop: worker round trips stay in the tens of µs. Its window is long
    # enough to catch a keep-alive client's next request too (~0.3 ms after an answer), when
    # no worker is being started or stopped (see Loader). Alternating 600 and 200 µs in one
    # service (workers at 600, see runtime): warm fetch p50 0.40 against 0.43 ms from one
    # client (four rounds), 3,524 against 3,655 req/s on four connections (three).
    run(server.serve(), spin_us=SERVE_SPIN_US)


SERVE_SPIN_US = 600
"""The service's spin window (see rpc._loop)."""
