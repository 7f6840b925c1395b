"""``workerloader dev PATH``: serve a worker from local files, reloading on change."""

# No `from __future__ import annotations` here: FastAPI reads the handler annotations at
# definition time, and they name classes imported inside the command.

from pathlib import Path

import click

from ._common import data_dir_option


def _snapshot(path: Path) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, envvar="WORKERLOADER_HOST")
@click.option("--port", default=8787, show_default=True, envvar="WORKERLOADER_PORT")
@data_dir_option
def dev(path: Path, host: str, port: int, data_dir: Path) -> None:
    """Serve the worker in PATH (main.py and its modules) on HOST:PORT: every request goes to
    its fetch; editing a file loads the new code on the next request (like ``wrangler dev``)."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from .. import Loader, WorkerCode
    from .. import Request as WorkerRequest
    from ..rpc._loop import run
    from ..server._execute import _error
    from ..server._workers import WorkerDefinition, _modules
    from ._workers import read_worker_dir

    state: dict[str, object] = {"version": 0, "snapshot": {}}
    loaders: list[Loader] = []

    def code() -> WorkerCode:
        loader = loaders[0]
        definition = WorkerDefinition.model_validate(read_worker_dir(path))
        return WorkerCode(
            main_module=definition.main_module,
            modules=_modules(definition.modules),
            env={"SDK": loader.sdk("default")},  # the namespace `exec` uses too
        )

    async def main() -> None:
        async with Loader(data_dir, pool_size=2) as loader:
            loaders.append(loader)
            app = FastAPI(title="workerloader dev")

            @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
            async def forward(rest: str, request: Request) -> Response:
                snapshot = _snapshot(path)
                if snapshot != state["snapshot"]:
                    state["snapshot"] = snapshot
                    state["version"] = int(str(state["version"])) + 1
                    click.echo(f"[dev] loading {path} (version {state['version']})")
                stub = loader.get(f"dev@{state['version']}", code)
                query = f"?{request.url.query}" if request.url.query else ""
                forwarded = WorkerRequest(
                    f"http://{host}:{port}/{rest}{query}",
                    method=request.method,
                    headers=dict(request.headers),
                    body=await request.body(),
                )
                try:
                    response = await stub.fetch(forwarded)
                except Exception as exc:
                    for line in getattr(exc, "logs", []):
                        click.echo(f"[log] {line}")
                    return JSONResponse({"ok": False, "error": _error(exc)}, 500)
                for line in stub.logs:
                    click.echo(f"[log] {line}")
                return Response(await response.bytes(), response.status, headers=response.headers)

            server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
            await server.serve()

    run(main())
