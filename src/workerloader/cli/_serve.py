"""``workerloader serve``: the HTTP service (arrives with the service issue)."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True)
def serve(host: str, port: int) -> None:
    """Serve /health and /execute on HOST:PORT (not built yet)."""
    click.echo(
        f"workerloader serve will run the HTTP service on http://{host}:{port} "
        "(/health, /execute, /workers); it is not built yet. "
        "What exists today: the RPC layer (try `workerloader bench rpc`)."
    )
