"""``workerloader dev PATH``: serve a worker from local files, reloading on change."""

# No `from __future__ import annotations` here: FastAPI reads the handler annotations at
# definition time, and they name classes imported inside the command.

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click

from ._common import (
    binding_option,
    check_env_and_bindings,
    config_option,
    data_dir_option,
    env_option,
    insecure_option,
    option,
    service_config,
    shown,
)

_NO_AI = (
    "no AI provider is configured ([ai] base_url and model in workerloader.toml or --config, "
    "or WORKERLOADER_AI_BASE_URL and WORKERLOADER_AI_MODEL)"
)


def _snapshot(path: Path) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="WORKERLOADER_HOST",
    help="The address to listen on.",
)
@option(
    "--port",
    default=8787,
    show_default=True,
    envvar="WORKERLOADER_PORT",
    help="The port to listen on.",
)
@env_option("WORKERLOADER_ENV")
@binding_option("WORKERLOADER_BINDING")
@data_dir_option
@config_option
@insecure_option
def dev(
    path: Path,
    host: str,
    port: int,
    env: dict[str, object],
    bindings: dict[str, dict[str, object]],
    data_dir: Path,
    config_path: Path | None,
    insecure: bool,
) -> None:
    """Serve the worker in PATH (main.py and its modules) on HOST:PORT: every request goes to
    its fetch; editing a file loads the new code on the next request (like ``wrangler dev``).
    Its env gets --env data and --binding bindings as ``workers put`` gives them, in namespace
    "default"; without a --binding SDK, env.SDK is that namespace's sdk. The AI provider and
    HTTP gateway are the ones `serve` would have: --config (or ./workerloader.toml) and the
    WORKERLOADER_AI_* / WORKERLOADER_API_* variables.

    Answers as the service's fetch proxy does (``/workers/{id}/fetch/...``): the same
    methods, the request's URL named after the directory (``https://PATH-NAME/...``), and a
    failed call is 422 (the code's error: it failed to load or raised), 504 (wall time) or
    502 (the worker died), with the service's JSON error body."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from .. import Loader, WorkerCode
    from .. import Request as WorkerRequest
    from ..rpc._loop import run
    from ..server._app import SizeCap
    from ..server._protocol import BoundedHttpProtocol
    from ..server._store import Caller
    from ..server._workers import (
        FETCH_METHODS,
        NO_BODY,
        BodyBrokeOff,
        WorkerDefinition,
        _code,
        _end_to_end,
        _failure,
        check_definition,
        quiet_broken_bodies,
        request_headers,
    )
    from ._workers import read_worker_dir

    check_env_and_bindings(env, bindings)
    service = service_config(config_path)  # the service's AI, gateway and quota
    ai, api = service.ai, service.api
    for name, binding in bindings.items():
        if binding["type"] == "ai" and ai is None:
            raise click.UsageError(f"--binding {name}=ai: {_NO_AI}")
        if binding["type"] == "api" and api is None:
            raise click.UsageError(
                f"--binding {name}=api: no HTTP gateway is configured ([bindings.api] in "
                "workerloader.toml or --config, or WORKERLOADER_API_ALLOW)"
            )
    if "SDK" not in env and "SDK" not in bindings:
        bindings = {**bindings, "SDK": {"type": "sdk"}}
    caller = Caller(None, "default", False)  # the namespace `exec` uses too
    site = path.resolve().name  # the host of the URLs the worker's fetch sees
    state: dict[str, object] = {"version": 0, "snapshot": {}}
    loaders: list[Loader] = []

    def code() -> WorkerCode:
        definition = WorkerDefinition.model_validate(
            {**read_worker_dir(path), "env": env, "bindings": bindings}
        )
        check_definition(definition)
        return _code(loaders[0], caller, definition, api)

    async def main() -> None:
        async with Loader(
            data_dir,
            pool_size=2,
            insecure=insecure,
            ai=ai,
            storage_quota_mb=service.storage_quota_mb,
            sandbox_python=service.sandbox_python,
        ) as loader:
            loaders.append(loader)
            app = FastAPI(title="workerloader dev")
            quiet_broken_bodies()

            @app.api_route("/{rest:path}", methods=list(FETCH_METHODS))
            async def forward(rest: str, request: Request) -> Response:
                snapshot = _snapshot(path)
                if snapshot != state["snapshot"]:
                    state["snapshot"] = snapshot
                    state["version"] = int(str(state["version"])) + 1
                    click.echo(f"[dev] loading {path} (version {state['version']})")
                stub = loader.get(f"dev@{state['version']}", code)
                query = f"?{request.url.query}" if request.url.query else ""
                forwarded = WorkerRequest(
                    f"https://{site}/{rest}{query}",
                    method=request.method,
                    headers=request_headers(request),
                    body=await request.body(),
                )
                try:
                    response = await stub.fetch(forwarded)
                except Exception as exc:
                    status, body = _failure(exc)  # re-raises what is not the worker's doing
                    for line in body["logs"]:
                        click.echo(f"[log] {shown(line)}")
                    click.echo(f"[dev] {status} {_detail(exc, body)}")
                    return JSONResponse(body, status)
                for line in stub.logs:
                    click.echo(f"[log] {shown(line)}")
                headers = _end_to_end(response)
                if request.method == "HEAD" or response.status in NO_BODY:
                    response.discard()  # no body goes out: the worker need not make one
                    return Response(b"", response.status, headers=headers)
                if not response.streaming:
                    return Response(await response.bytes(), response.status, headers=headers)

                async def streamed() -> AsyncIterator[bytes]:
                    # As the service streams: chunk by chunk, and a worker failing midway
                    # ends the connection without the body's last chunk (the status is out).
                    try:
                        async for chunk in response.chunks():
                            yield chunk
                    except Exception as exc:
                        _, body = _failure(exc)
                        click.echo(f"[dev] the body broke off: {_detail(exc, body)}")
                        raise BodyBrokeOff(body["error"]["type"]) from exc

                return StreamingResponse(streamed(), response.status, headers=headers)

            app.add_middleware(SizeCap)  # requests capped as the service's are (413, 431)
            # Heads bounded as the service's are (431, 408), and connections at serve's
            # default cap (503): BoundedHttpProtocol's own max_connections.
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host=host,
                    port=port,
                    http=BoundedHttpProtocol,
                    ws="none",  # as serve's (see there)
                    log_level="info",
                )
            )
            await server.serve()

    run(main())


def _detail(exc: Exception, body: dict[str, Any]) -> str:
    """What a failed call's line in dev's output says: its traceback, or its error."""
    from .. import WorkerLoadError

    error = body["error"]
    detail = error["traceback"] or (
        str(exc)  # a load error reads "file:line: Type: message"
        if isinstance(exc, WorkerLoadError)
        else f"{error['type']}: {error['message']}"
    )
    return shown(str(detail).rstrip(), lines=True)
