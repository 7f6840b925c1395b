"""``workerloader serve``: the HTTP service on uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import data_dir_option


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="WORKERLOADER_HOST")
@click.option("--port", default=8787, show_default=True, envvar="WORKERLOADER_PORT")
@data_dir_option
@click.option(
    "--insecure",
    is_flag=True,
    envvar="WORKERLOADER_INSECURE",
    help="Run workers unconfined where this machine has no sandbox (says so in every log).",
)
def serve(host: str, port: int, data_dir: Path, insecure: bool) -> None:
    """Serve /health and /execute on HOST:PORT."""
    import uvicorn

    from ..rpc._loop import run
    from ..server import ServerConfig, create_app

    app = create_app(ServerConfig(data_dir=data_dir, insecure=insecure))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    run(server.serve())  # on the spinning loop: worker round trips stay in the tens of µs
