"""The ASGI app: ``/health``, ``/execute``, stored workers, ``/logs`` and OpenAPI at ``/docs``."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import Limits, Loader, __version__
from ..bindings import AiConfig, HttpGateway
from ..loader._loader import DEFAULT_STORAGE_QUOTA_MB, valid_namespace
from ._execute import execute
from ._schema import bad_request, error_answer, json_body, statuses_as_answered
from ._store import Caller, ServiceStore
from ._workers import FETCH_METHODS, FetchHandler, quiet_broken_bodies, workers_router

__all__ = ["ServerConfig", "SizeCap", "create_app"]

MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 10
"""All of a request's header names and values together: past this, 431."""


class ExecuteLimits(BaseModel):
    """Limits of a ``POST /execute`` worker: a request's ``limits`` (and ``timeout_ms``), the
    rest from the service's defaults (``[limits]`` in its config file)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt limit is an error, not a default

    cpu_ms: int = Field(default=1000, ge=1, le=60_000)
    memory_mb: int = Field(default=128, ge=16, le=4096)
    wall_ms: int = Field(default=30_000, ge=1000, le=300_000)


@dataclass(frozen=True)
class ServerConfig:
    """How the service runs; built by the CLI from flags, environment and the config file."""

    data_dir: Path = Path(".workerloader")
    insecure: bool = False
    pool_size: int = 32
    """Workers the zygote keeps forked ahead (it forks half of them again at once when half
    are taken). A service takes one per ``POST /execute``: cold ``POST /execute`` on two cores,
    alternating two services in ten rounds, 8 against 32: p50 from one client 3.09 against
    2.34 ms (lower in all ten), 265 against 297 new executions/s on four connections (higher
    in nine), the service's CPU per execution 1.96 against 1.66 ms; 64 did no better than
    32. Each waits in ~1.1 MB of its own."""
    max_concurrent_executions: int = 64
    log_retention_s: float = 7 * 86400
    log_max_bytes: int = 1 << 30
    """Past this size of the service's database (its request log, mostly), the oldest request
    records are deleted."""
    storage_quota_mb: int | None = DEFAULT_STORAGE_QUOTA_MB
    """The most each namespace keeps in each of its stores (None: no quota; see
    ``Loader``)."""
    ai: AiConfig | None = None
    require_auth: bool = False
    """Refuse anonymous requests even while no API key exists (no dev mode)."""
    execute_limits: ExecuteLimits = field(default_factory=ExecuteLimits)
    """The limits of ``POST /execute`` workers where a request does not set them."""
    sandbox_python: str | None = None
    """The interpreter workers run on (None: the service's own; see ``Loader``)."""
    api: HttpGateway | None = None
    """The HTTP gateway ``/execute`` code gets as ``api`` (and ``sdk.api``), as do stored
    workers' ``sdk`` and ``api`` bindings; None: no outbound HTTP."""


class ExecuteRequest(BaseModel):
    """The body of ``POST /execute``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored

    code: str = Field(max_length=MAX_BODY_BYTES, description="The body of an async function.")
    # At least a second: starting a sandboxed worker takes milliseconds (more on a loaded
    # machine), and a wall time that the start itself can use up would answer 504 to anything.
    timeout_ms: int | None = Field(default=None, ge=1000, le=300_000, description="Wall time.")
    limits: ExecuteLimits | None = None
    language: str = Field(default="python", pattern="^python$")


class _BodyTooLarge(Exception):
    """A request's body grew past ``MAX_BODY_BYTES`` while it was read (no length declared)."""


def _too_large() -> JSONResponse:
    return error_answer(413, "PayloadTooLarge", f"bodies are limited to {MAX_BODY_BYTES} bytes")


class SizeCap:
    """Plain ASGI in front of an app (Starlette's ``BaseHTTPMiddleware`` costs ~0.3 ms a
    request): 431 for headers over ``MAX_HEADER_BYTES`` and 413 for a body over
    ``MAX_BODY_BYTES``, for every route and however the body comes. A declared length over
    it is refused before the body is read, and a body sent without one (chunked) is counted
    as it arrives and refused once it passes the cap, if no response has started by then.
    The service and ``workerloader dev`` both sit behind it. (The headers are read by then:
    their connection bounds them on the wire, see ``_protocol``.) A MemoryError before the
    answer started is a 503, and a client gone mid-body gets no answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = 0
        for name, value in scope["headers"]:
            header_bytes += len(name) + len(value)
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                await _too_large()(scope, receive, send)
                return
        if header_bytes > MAX_HEADER_BYTES:
            message = f"request headers are limited to {MAX_HEADER_BYTES} bytes"
            await error_answer(431, "RequestHeaderFieldsTooLarge", message)(scope, receive, send)
            return
        received = 0
        started = False

        async def capped_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        async def watched_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except ClientDisconnect:  # gone before its body was all there: nobody to answer
            return
        except MemoryError:
            # SQLite at its heap limit (a worker's query can hold most of it for seconds) or
            # the host short of memory: a passing state, not the request's fault.
            if started:
                raise
            message = "the service is short of memory for this request right now; try again"
            await error_answer(503, "ServiceUnavailable", message)(scope, receive, send)
        except _BodyTooLarge:
            if started:  # too late for a status: the connection ends without the rest
                raise
            await _too_large()(scope, receive, send)


class _Front:
    """Plain ASGI in front of FastAPI: the busy endpoints (the worker fetch proxy, ``POST
    /execute``) go straight to their handlers, behind a ``SizeCap`` of their own; every other
    request goes on to ``app``, FastAPI's own stack. FastAPI's router and parameter
    resolution would add ~0.1 ms to each busy request, and its middleware (error pages,
    telemetry, which looks up OpenTelemetry's providers on every request) more; their
    FastAPI routes stay for the OpenAPI document and call the same handlers. An exception
    escaping a busy handler is answered 500 by uvicorn, as FastAPI's error middleware
    would."""

    def __init__(
        self,
        app: Any,
        fetch: FetchHandler,
        execute: Callable[[Request], Awaitable[JSONResponse]],
    ) -> None:
        self.app = app
        self.fetch = fetch
        self.execute = execute
        self._fetch = SizeCap(self._fetch_route)
        self._execute = SizeCap(self._execute_route)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if (found := _fetch_parts(scope)) is not None:
                worker_id, path = found
                scope["path_params"] = {"worker_id": worker_id, "path": path}  # as routed
                await self._fetch(scope, receive, send)
                return
            if scope["path"] == "/execute" and scope["method"] == "POST":
                await self._execute(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _fetch_route(self, scope: Any, receive: Any, send: Any) -> None:
        params = scope["path_params"]
        proxied = await self.fetch(params["worker_id"], params["path"], Request(scope, receive))
        await proxied(scope, receive, send)

    async def _execute_route(self, scope: Any, receive: Any, send: Any) -> None:
        answer = await self.execute(Request(scope, receive))
        await answer(scope, receive, send)


def _fetch_parts(scope: Any) -> tuple[str, str] | None:
    """The worker id and path of a request to ``/workers/{worker_id}/fetch/{path:path}``, or
    to ``/workers/{worker_id}/fetch`` itself (the worker's root, not a redirect to it); None
    for any other request.

    The path is the one the client sent, still percent-encoded (the ASGI ``raw_path``, where
    the server gives one): decoded, ``a%2Fb`` would reach the worker as two segments and
    ``%3F`` as the start of a query. The id is decoded, as routes decode it."""
    raw: bytes | None = scope.get("raw_path")
    # (httpx's in-process transport puts the query into raw_path; servers do not)
    target = raw.partition(b"?")[0].decode("latin-1") if raw is not None else scope["path"]
    parts = target.split("/", 4)
    if (
        len(parts) >= 4
        and parts[1] == "workers"
        and parts[2]
        and parts[3] == "fetch"
        and scope["method"] in FETCH_METHODS
    ):
        return unquote(parts[2]), parts[4] if len(parts) == 5 else ""
    return None


class _Service(FastAPI):
    """The service's FastAPI app, with ``front`` (once set) taking every request first."""

    front: _Front | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.front is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as FastAPI sets it, for handlers that look
        await self.front(scope, receive, send)


def _other_namespace(caller: Caller, namespace: str | None) -> JSONResponse | None:
    """The 403 for a caller asking for another namespace's logs, else None."""
    if namespace is None or namespace == caller.namespace:
        return None
    message = f"this key sees the logs of namespace {caller.namespace!r} only"
    return error_answer(403, "PermissionDenied", message)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The service's ASGI app; its lifespan owns a Loader."""
    config = config or ServerConfig()
    quiet_broken_bodies()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Loader(
            config.data_dir,
            pool_size=config.pool_size,
            sandbox_python=config.sandbox_python,
            insecure=config.insecure,
            ai=config.ai,
            storage_quota_mb=config.storage_quota_mb,
        ) as loader:
            state["loader"] = loader
            store = state["store"] = ServiceStore(
                config.data_dir,
                retention_s=config.log_retention_s,
                max_bytes=config.log_max_bytes,
            )
            state["slots"] = asyncio.Semaphore(config.max_concurrent_executions)
            state["api"] = config.api

            async def flush_logs() -> None:  # request logs are written in batches
                while True:
                    await asyncio.sleep(0.2)
                    store.flush(when_due=True)

            flusher = asyncio.ensure_future(flush_logs())
            # Everything made so far lives as long as the service. Out of the collector's
            # generations, it is no longer walked on every full collection, which the many
            # short-lived containers of each request trigger (measured: ~11% of the server's
            # CPU under a stream of /execute requests). Freezing is process-wide: a cycle among
            # these objects is never collected, and two apps in one process (tests) share it.
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()
                flusher.cancel()
                store.flush()

    def authenticate(request: Request) -> Caller | JSONResponse:
        """The caller bound to the request's API key; dev mode (anonymous, namespace
        "default") while no key exists."""
        store: ServiceStore = state["store"]
        if not config.require_auth and not store.has_keys():
            return Caller(None, "default", False)
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        caller = store.caller_for(secret.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            return error_answer(
                401,
                "Unauthorized",
                "send a valid API key: Authorization: Bearer <key>",
                headers={"www-authenticate": "Bearer"},
            )
        try:
            valid_namespace(caller.namespace)
        except ValueError:  # a key made before namespaces were checked at creation
            message = f"this key's namespace {caller.namespace!r} is invalid: revoke the key"
            return error_answer(403, "PermissionDenied", message)
        return caller

    app = _Service(title="workerloader", version=__version__, lifespan=lifespan)
    router, fetch_worker = workers_router(state, authenticate)
    app.include_router(router)
    make_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = statuses_as_answered(make_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(exc)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The router's own refusals (no such route, a method it does not take) in the
        # service's error shape, not FastAPI's {"detail": ...}.
        kind = "".join(HTTPStatus(exc.status_code).phrase.title().split())
        return error_answer(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Service status: version, sandbox mode, live workers, auth mode."""
        loader: Loader = state["loader"]
        store: ServiceStore = state["store"]
        return {
            "status": "ok",
            "version": __version__,
            "sandbox": "insecure" if loader._sandbox.insecure else "confined",
            "workers": len(loader._workers),
            "auth": "keys" if config.require_auth or store.has_keys() else "dev",
        }

    @app.post(
        "/execute",
        openapi_extra=json_body(ExecuteRequest),
    )
    async def execute_code(request: Request) -> JSONResponse:
        """Run ``code`` as the body of an async function with ``env``, ``sdk``, ``db``, ``kv``,
        ``sql``, ``blobs``, ``ai``, ``api`` and ``context`` in scope; answers ``{"ok",
        "result" | "error", "logs", "duration_ms", "cpu_ms"}``."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        # The body is JSON whatever the Content-Type says: `curl -d '{"code": ...}'` sends
        # form encoding, and that is how most people first try the service.
        store: ServiceStore = state["store"]
        try:
            body = ExecuteRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            store.log(caller, "execute", 400, 0.0, error_type="BadRequest")
            return bad_request(exc, ExecuteRequest)
        loader: Loader = state["loader"]
        slots: asyncio.Semaphore = state["slots"]
        if slots.locked():
            store.log(caller, "execute", 429, 0.0, error_type="TooManyRequests")
            return error_answer(429, "TooManyRequests", "too many executions in flight; retry")
        requested = config.execute_limits
        if body.limits is not None:  # what the request sets; the service's defaults the rest
            requested = requested.model_copy(update=body.limits.model_dump(exclude_unset=True))
        limits = Limits(
            cpu_ms=requested.cpu_ms,
            memory_mb=requested.memory_mb,
            wall_ms=body.timeout_ms or requested.wall_ms,
        )
        sdk = loader.sdk(
            caller.namespace,
            user_id=caller.user_id,
            authenticated=caller.authenticated,
            permissions=caller.permissions,
            api=config.api,
        )
        async with slots:
            outcome = await execute(loader, body.code, limits, sdk)
        error = outcome.body.get("error")
        store.log(
            caller,
            "execute",
            outcome.status,
            outcome.body["duration_ms"],
            cpu_ms=outcome.body["cpu_ms"],
            error_type=error["type"] if error else None,
            logs=outcome.body["logs"],
        )
        return JSONResponse(outcome.body, outcome.status)

    app.add_middleware(SizeCap)  # for the routes _Front passes on
    app.front = _Front(partial(FastAPI.__call__, app), fetch=fetch_worker, execute=execute_code)

    @app.get("/logs/stream")
    async def stream_logs(
        request: Request,
        worker: str | None = None,
        namespace: str | None = None,
        status: int | None = Query(None, ge=100, le=599),
    ) -> Any:
        """Server-sent events: each new request-log record of the caller's namespace as it
        is written (``data: {json}``), filtered by worker and status as ``/logs`` is. The key
        is checked again on every poll: once it is revoked the stream ends."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        if (refused := _other_namespace(caller, namespace)) is not None:
            return refused
        store: ServiceStore = state["store"]

        async def events() -> AsyncIterator[bytes]:
            since = time.time()
            seen: set[str] = set()  # the records sent whose time is ``since``
            yield b": workerloader request log\n\n"
            while not await request.is_disconnected():
                if isinstance(authenticate(request), JSONResponse):
                    yield b"event: error\ndata: the key is no longer valid\n\n"
                    return
                records = store.logs(
                    caller.namespace, worker=worker, status=status, since=since, limit=1000
                )
                for record in reversed(records):
                    if record["id"] in seen:
                        continue
                    if record["time"] > since:
                        since, seen = record["time"], set()
                    seen.add(record["id"])
                    yield b"data: " + json.dumps(record).encode() + b"\n\n"
                await asyncio.sleep(0.25)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/logs")
    async def request_logs(
        request: Request,
        worker: str | None = None,
        namespace: str | None = None,
        status: int | None = Query(None, ge=100, le=599),
        since: float | None = Query(None, allow_inf_nan=False),
        until: float | None = Query(None, allow_inf_nan=False),
        limit: int = Query(100, ge=1, le=1000),
    ) -> JSONResponse:
        """The caller's namespace's request logs, newest first, filtered by worker, status and
        time (``since`` and ``until`` are Unix times, inclusive). A key sees its own
        namespace only: ``namespace`` naming another is a 403."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        if (refused := _other_namespace(caller, namespace)) is not None:
            return refused
        store: ServiceStore = state["store"]
        records = store.logs(
            caller.namespace, worker=worker, status=status, since=since, until=until, limit=limit
        )
        return JSONResponse({"logs": records})

    return app
