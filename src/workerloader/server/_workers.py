"""``/workers``: workers stored by the service, and calls into them (fetch proxy and RPC)."""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import Limits, Loader, WorkerCode
from .. import Request as WorkerRequest
from .. import Response as WorkerResponse
from .._errors import (
    DataCloneError,
    LimitExceeded,
    WorkerCrashed,
    WorkerloaderError,
    WorkerLoadError,
)
from ..bindings import HttpGateway
from ._execute import NotJsonError, _error, failure_status, to_json
from ._schema import bad_request, error_answer, json_body
from ._store import Caller, ServiceStore

__all__ = [
    "FETCH_METHODS",
    "NO_BODY",
    "BadDefinition",
    "BodyBrokeOff",
    "FetchHandler",
    "WorkerDefinition",
    "check_definition",
    "quiet_broken_bodies",
    "request_headers",
    "workers_router",
]

FETCH_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
"""The methods ``/workers/{id}/fetch/{path}`` proxies into the worker."""

FetchHandler = Callable[[str, str, Request], Awaitable[Response]]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class WorkerLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt limit is an error, not a default

    cpu_ms: int = Field(default=1000, ge=1, le=60_000)
    memory_mb: int = Field(default=128, ge=16, le=4096)
    wall_ms: int = Field(default=30_000, ge=1000, le=300_000)
    subrequests: int = Field(default=1000, ge=0, le=100_000)


class Binding(BaseModel):
    """A binding the worker's ``env`` gets, in the caller's namespace."""

    model_config = ConfigDict(extra="forbid")  # ``"writ": false`` must not leave it writable

    type: Literal["kv", "sql", "db", "blobs", "sdk", "ai", "api"]
    read: bool = True
    write: bool = True


class WorkerDefinition(BaseModel):
    """The body of ``PUT /workers/{id}``: code, data, bindings and limits."""

    # A misspelt field (``"binding"``, ``"limit"``) is an error: dropped, it would store a
    # worker without what its author meant it to have.
    model_config = ConfigDict(extra="forbid")

    main_module: str = Field(max_length=256)
    modules: dict[str, str | dict[str, Any]] = Field(
        description='Python source, or {"json": ...}, {"text": str}, {"data_base64": str}'
    )
    env: dict[str, Any] = Field(default_factory=dict, description="Plain JSON data.")
    bindings: dict[str, Binding] = Field(default_factory=dict)
    limits: WorkerLimits = Field(default_factory=WorkerLimits)


class BadDefinition(ValueError):
    """A definition the service refuses to store; the message says where it is wrong. The
    client's mistake: a 400, never a 500."""


def _modules(modules: dict[str, str | dict[str, Any]]) -> dict[str, object]:
    """``modules`` as WorkerCode takes them: ``{"data_base64": str}`` decoded to bytes.
    Raises BadDefinition naming the module whose ``data_base64`` is not base64 text."""
    out: dict[str, object] = {}
    for path, value in modules.items():
        if isinstance(value, dict) and set(value) == {"data_base64"}:
            where = f"modules[{path!r}]['data_base64']"
            data = value["data_base64"]
            if not isinstance(data, str):
                raise BadDefinition(f"{where} must be a base64 string, not {type(data).__name__}")
            try:
                # Lenient as before (characters outside the alphabet are skipped): stored
                # workers with line-wrapped base64 keep loading.
                out[path] = {"data": base64.b64decode(data)}
            except ValueError as exc:  # binascii.Error, or a non-ASCII str
                raise BadDefinition(f"{where} is not valid base64: {exc}") from exc
        else:
            out[path] = value
    return out


def _check_finite(value: object, where: str) -> None:
    """Raise BadDefinition naming ``where`` an infinite or NaN float sits in ``value``.

    JSON has no such numbers, yet the body's parser reads ``1e999`` as inf (and accepts
    ``NaN``/``Infinity``): stored, such a definition could never be answered as JSON again."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BadDefinition(
            f"{where} is {value!r}, which JSON cannot carry (send it as a string, or null)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        # Nesting is bounded: the JSON parser refuses bodies past its recursion limit.
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")


def check_definition(definition: WorkerDefinition) -> None:
    """Raise BadDefinition if ``definition`` holds what the service refuses to store (an
    infinite or NaN float anywhere, a ``data_base64`` that is not base64, a name that is both
    env data and a binding: named); the service and ``workers put`` both check it. (Stored
    ones load leniently: line breaks and stray characters were accepted before.)"""
    both = sorted(set(definition.env) & set(definition.bindings))
    if both:  # the binding would silently replace the data
        raise BadDefinition(f"{', '.join(both)}: named in both env and bindings")
    for field, value in definition.model_dump().items():
        _check_finite(value, field)
    for path, module in definition.modules.items():
        if isinstance(module, dict) and isinstance(module.get("data_base64"), str):
            try:
                base64.b64decode("".join(module["data_base64"].split()), validate=True)
            except ValueError as exc:
                where = f"modules[{path!r}]['data_base64']"
                raise BadDefinition(f"{where} is not valid base64: {exc}") from exc


def _bad_request(message: str) -> JSONResponse:
    """400 with ``message``: the request is the client's mistake (422 is kept for user code
    that failed)."""
    return error_answer(400, "BadRequest", message)


def _read_only(caller: Caller) -> JSONResponse | None:
    """The 403 answer if ``caller`` may not write, else None. Storing and deleting workers
    both change the namespace: both need ``write``."""
    if "write" in caller.permissions:
        return None
    return error_answer(403, "Forbidden", "a read-only key")


_RPC_BODY = {
    "anyOf": [
        {"type": "array", "description": "the arguments"},
        {
            "type": "object",
            "properties": {"args": {"type": "array"}, "kwargs": {"type": "object"}},
        },
    ]
}
"""The body of ``POST /workers/{id}/rpc/{entrypoint}/{method}``, for the OpenAPI document."""


def _cache_key(caller: Caller, worker_id: str, stored: dict[str, Any]) -> str:
    """The Loader id of a stored worker as ``caller`` runs it. It carries the version and the
    time it was stored, so an update never serves old code (a version starts at 1 again after
    a delete, which another process, the CLI, may have made: the time tells the two apart);
    the namespace, so two namespaces' workers of one name never share a process; and the
    caller's identity and grants, which its bindings and ``sdk.context`` are made of, so a
    warm worker never serves one caller with another's."""
    grants = ",".join(sorted(caller.permissions))
    who = f"{caller.user_id}|{int(caller.authenticated)}|{grants}"
    return f"{caller.namespace}/{worker_id}@{stored['version']}:{stored['updated']!r}#{who}"


def _refuse_ai_bindings(definition: WorkerDefinition) -> None:
    """BadDefinition for an AI binding, on a service with no AI provider: its calls could
    only fail. (Checked when a worker is stored through the service; one stored earlier, or
    by the CLI, which cannot know the service's config, gets the binding, whose calls say
    that no provider is configured.)"""
    for name, binding in definition.bindings.items():
        if binding.type == "ai":
            raise BadDefinition(
                f"bindings[{name!r}] is an AI binding, and this service has no AI provider "
                "(configure [ai] base_url and model in its config file)"
            )


def _code(
    loader: Loader,
    caller: Caller,
    definition: WorkerDefinition,
    api: HttpGateway | None = None,
) -> WorkerCode:
    env: dict[str, object] = dict(definition.env)
    ns = caller.namespace
    can_write = "write" in caller.permissions
    for name, binding in definition.bindings.items():
        read, write = binding.read, binding.write and can_write
        match binding.type:
            case "kv":
                env[name] = loader.kv(ns, read=read, write=write)
            case "sql":
                env[name] = loader.sql(ns, read=read, write=write)
            case "db":
                env[name] = loader.db(ns, read=read, write=write)
            case "blobs":
                env[name] = loader.blobs(ns, read=read, write=write)
            case "ai":
                env[name] = loader.ai()
            case "api":
                if api is None:
                    raise BadDefinition(
                        f"bindings[{name!r}] is an HTTP gateway, and this service has none "
                        "(configure [bindings.api] in its config file)"
                    )
                env[name] = api
            case "sdk":
                env[name] = loader.sdk(
                    ns,
                    user_id=caller.user_id,
                    authenticated=caller.authenticated,
                    permissions=caller.permissions,
                    api=api,
                )
    limits = definition.limits
    return WorkerCode(
        main_module=definition.main_module,
        modules=_modules(definition.modules),
        env=env,
        limits=Limits(
            cpu_ms=limits.cpu_ms,
            memory_mb=limits.memory_mb,
            wall_ms=limits.wall_ms,
            subrequests=limits.subrequests,
        ),
    )


class BodyBrokeOff(Exception):
    """Raised out of a streamed response body whose worker failed midway: the server then
    ends the connection without the body's last chunk, which is how HTTP tells a client that
    a body is incomplete (its status has gone out)."""


def quiet_broken_bodies() -> None:
    """Leave ``BodyBrokeOff`` out of uvicorn's error log, which is for the server's own faults:
    the worker's error is in the request log, and its traceback in the server's log would
    let any worker write ~50 lines there per request."""
    logging.getLogger("uvicorn.error").addFilter(_not_a_broken_body)


def _not_a_broken_body(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], BodyBrokeOff))


def _failure(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The status and body for a call that failed: 504 wall time, 502 the worker died,
    422 everything the worker's code did."""
    # BadDefinition: a stored binding this service cannot give (any more).
    if (
        not isinstance(exc, (WorkerloaderError, BadDefinition))
        and type(exc).__module__ != "builtins"
    ):
        raise exc
    body = {"ok": False, "error": _error(exc), "logs": getattr(exc, "logs", [])}
    return failure_status(exc), body


def workers_router(state: dict[str, Any], authenticate: Any) -> tuple[APIRouter, FetchHandler]:
    """The ``/workers`` endpoints over the service's Loader and store, and the fetch proxy's
    handler (which the app also routes ahead of FastAPI, see ``_app._Front``)."""
    router = APIRouter()
    # The Loader ids each stored worker has run under (a version and a caller each): an
    # update or a delete stops all of them, not only the requesting caller's.
    started: dict[tuple[str, str], set[str]] = {}

    async def stop_all(namespace: str, worker_id: str) -> None:
        # Drained: a request in flight on the old version finishes (it was not the worker
        # that failed); new requests get the new version at once.
        for key in started.pop((namespace, worker_id), set()):
            await state["loader"].evict(key, drain=True)

    def not_found(worker_id: str) -> JSONResponse:
        return error_answer(404, "NotFound", f"no worker {worker_id!r}")

    def caller_and_stub(
        worker_id: str, request: Request, kind: str
    ) -> tuple[Caller, Any] | JSONResponse:
        """The authenticated caller and a stub on their stored worker ``worker_id``, or the
        401/404 answer (a 404 is logged as a ``kind`` call: the caller is known)."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        stub = stub_for(caller, worker_id)
        if stub is None:
            state["store"].log(caller, kind, 404, 0.0, worker=worker_id, error_type="NotFound")
            return not_found(worker_id)
        return caller, stub

    def stub_for(caller: Caller, worker_id: str) -> Any:
        store: ServiceStore = state["store"]
        loader: Loader = state["loader"]
        stored = store.get_worker(caller.namespace, worker_id)
        if stored is None:
            return None
        key = _cache_key(caller, worker_id, stored)
        started.setdefault((caller.namespace, worker_id), set()).add(key)

        def factory() -> WorkerCode:  # runs only when no warm worker holds the key
            fields = {k: v for k, v in stored.items() if k in WorkerDefinition.model_fields}
            definition = WorkerDefinition.model_validate(fields)
            return _code(loader, caller, definition, state.get("api"))

        return loader.get(key, factory)

    @router.put(
        "/workers/{worker_id}",
        openapi_extra=json_body(WorkerDefinition),
    )
    async def put_worker(worker_id: str, request: Request) -> JSONResponse:
        """Store (or replace) a worker: code, env data, bindings and limits. 403 for a
        read-only key; 400 for a malformed body, a module whose ``data_base64`` is not base64,
        an infinite/NaN float anywhere in it, or env data no worker can take (too deep, an
        int too large: naming where); 422 if the worker fails to load (an error, a limit hit
        or a crash while its modules are imported)."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        if (forbidden := _read_only(caller)) is not None:
            return forbidden
        if not _ID.fullmatch(worker_id):
            return _bad_request(
                f"invalid worker id {worker_id[:80]!r}: 1 to 64 letters, digits, '_', '.' or "
                "'-', starting with a letter or digit"
            )
        try:
            definition = WorkerDefinition.model_validate_json(await request.body())
        except ValidationError as exc:
            return bad_request(exc, WorkerDefinition)
        loader: Loader = state["loader"]
        try:
            check_definition(definition)
            code = _code(loader, caller, definition, state.get("api"))
            if loader.ai_config is None:
                _refuse_ai_bindings(definition)
        except BadDefinition as exc:
            return _bad_request(str(exc))
        try:  # validate now: a broken worker is refused, not stored
            stub = await loader.load(code)
            await stub.aclose()
        except DataCloneError as exc:  # env data that cannot reach a worker: the body's
            return _bad_request(f"the definition cannot be sent to a worker: {exc}")
        except (WorkerLoadError, LimitExceeded, WorkerCrashed) as exc:
            # Failed to load: an error, or a limit or crash while its modules were imported.
            # (The sandbox failing is the service's trouble, not the definition's: not here.)
            return JSONResponse({"ok": False, "error": _error(exc)}, 422)
        store: ServiceStore = state["store"]
        version = store.put_worker(caller.namespace, worker_id, definition.model_dump())
        await stop_all(caller.namespace, worker_id)  # the old version's processes
        return JSONResponse({"ok": True, "id": worker_id, "version": version})

    @router.get("/workers")
    async def list_workers(request: Request) -> JSONResponse:
        """The caller's namespace's workers."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        return JSONResponse({"workers": state["store"].list_workers(caller.namespace)})

    @router.get("/workers/{worker_id}")
    async def get_worker(worker_id: str, request: Request) -> JSONResponse:
        """A worker's stored definition."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        stored = state["store"].get_worker(caller.namespace, worker_id)
        return JSONResponse(stored) if stored is not None else not_found(worker_id)

    @router.delete("/workers/{worker_id}")
    async def delete_worker(worker_id: str, request: Request) -> JSONResponse:
        """Delete a worker (its warm processes, one per caller, are stopped). 403 for a
        read-only key, as for PUT, checked before the lookup; 404 if there is no such worker."""
        caller = authenticate(request)
        if isinstance(caller, JSONResponse):
            return caller
        if (forbidden := _read_only(caller)) is not None:
            return forbidden
        store: ServiceStore = state["store"]
        stored = store.get_worker(caller.namespace, worker_id)
        if stored is None or not store.delete_worker(caller.namespace, worker_id):
            return not_found(worker_id)
        await stop_all(caller.namespace, worker_id)
        return JSONResponse({"ok": True})

    async def fetch_worker(worker_id: str, path: str, request: Request) -> Response:
        """Proxy the request into the worker's ``fetch``."""
        found = caller_and_stub(worker_id, request, "fetch")
        if isinstance(found, JSONResponse):
            return found
        caller, stub = found
        started = time.perf_counter()
        # From the scope as sent: building request.url (an URL object) cost ~3% of the
        # server's CPU under a stream of warm fetches.
        raw_query: bytes = request.scope.get("query_string", b"")
        query = f"?{raw_query.decode('latin-1')}" if raw_query else ""
        forwarded = WorkerRequest(
            f"https://{worker_id}/{path}{query}",
            method=request.method,
            headers=request_headers(request),
            body=await request.body(),
        )
        try:
            response = await stub.fetch(forwarded)
        except Exception as exc:
            status, body = _failure(exc)
            _log(state, caller, "fetch", worker_id, status, started, body, stub.cpu_ms)
            return JSONResponse(body, status)
        logs = {"logs": stub.logs}
        if response.streaming and (request.method == "HEAD" or response.status in NO_BODY):
            response.discard()  # no body goes out: the worker need not make one
        if response.streaming:

            async def streamed() -> AsyncIterator[bytes]:
                # Each chunk goes out as the worker makes it, within the fetch's limits. If the
                # worker fails midway, the status has gone out: the connection ends without
                # the body's last chunk, which is how HTTP tells a client that a body is
                # incomplete. Logged once the stream is done, with its CPU, and with what
                # ended it if the worker failed.
                record: dict[str, Any] = {"logs": logs["logs"]}
                try:
                    async for chunk in response.chunks():
                        yield chunk
                except Exception as exc:
                    record["error"] = {"type": _failure(exc)[1]["error"]["type"]}
                    raise BodyBrokeOff(f"worker {worker_id!r}: {record['error']['type']}") from exc
                finally:
                    _log(
                        state,
                        caller,
                        "fetch",
                        worker_id,
                        response.status,
                        started,
                        record,
                        response.cpu_ms,
                    )

            return StreamingResponse(streamed(), response.status, headers=_end_to_end(response))
        _log(state, caller, "fetch", worker_id, response.status, started, logs, response.cpu_ms)
        content = b"" if response.status in NO_BODY else await response.bytes()
        return Response(content, response.status, headers=_end_to_end(response))

    for http_method in FETCH_METHODS:
        # One route per method: OpenAPI wants an operation id of its own for each.
        router.add_api_route(
            "/workers/{worker_id}/fetch/{path:path}",
            fetch_worker,
            methods=[http_method],
            operation_id=f"fetch_worker_{http_method.lower()}",
        )

    @router.post(
        "/workers/{worker_id}/rpc/{entrypoint}/{method}",
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": _RPC_BODY}},
            }
        },
    )
    async def rpc_worker(
        worker_id: str, entrypoint: str, method: str, request: Request
    ) -> JSONResponse:
        """Call an entrypoint's method with JSON ``{"args": [...], "kwargs": {...}}`` (or a
        bare list of args); ``Default`` names the default entrypoint. 400 for any other body
        (``props`` too: only the host sets them) and for ``fetch`` (the fetch proxy's);
        422 if the method failed or its result holds a value JSON cannot carry (an infinite
        or NaN float: ``NotJsonError``, naming where); 502/504 if the worker died or ran out
        of wall time."""
        found = caller_and_stub(worker_id, request, "rpc")
        if isinstance(found, JSONResponse):
            return found
        caller, stub = found
        arguments = await _rpc_arguments(request, worker_id, method)
        if isinstance(arguments, str):  # what is wrong with the request
            state["store"].log(caller, "rpc", 400, 0.0, worker=worker_id, error_type="BadRequest")
            return _bad_request(arguments)
        args, kwargs = arguments
        started = time.perf_counter()
        name = None if entrypoint == "Default" else entrypoint
        entry = stub.get_entrypoint(name)
        called = False
        try:
            # The worker's method of that name, never an attribute of the host's stub (such as
            # its fetch, or anything starting with "_": AttributeError, a 422).
            call = type(entry).__getattr__(entry, method)
            called = True
            result = await call(*args, **kwargs)
        except Exception as exc:
            cpu_ms = stub.cpu_ms if called else 0.0  # refused here: no worker ran for it
            status, body = _failure(exc)
            body["cpu_ms"] = round(cpu_ms, 3)
            _log(state, caller, "rpc", worker_id, status, started, body, cpu_ms)
            return JSONResponse(body, status)
        try:
            answer = to_json(result)
        except NotJsonError as exc:
            # The method answered something JSON cannot carry: its code's failure, not ours.
            body = {
                "ok": False,
                "error": {"type": "NotJsonError", "message": str(exc)},
                "logs": stub.logs,
                "cpu_ms": round(stub.cpu_ms, 3),
            }
            _log(state, caller, "rpc", worker_id, 422, started, body, stub.cpu_ms)
            return JSONResponse(body, 422)
        body = {"ok": True, "result": answer, "logs": stub.logs, "cpu_ms": round(stub.cpu_ms, 3)}
        _log(state, caller, "rpc", worker_id, 200, started, body, stub.cpu_ms)
        return JSONResponse(body)

    return router, fetch_worker


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers about the connection, not the response (RFC 9110 §7.6.1), and the body's framing:
the service frames what it sends itself. From a worker, they could make one response read as
two by a client or a proxy that trusts them."""


NO_BODY = (204, 304)
"""Statuses whose responses have no body (RFC 9110): a worker's is dropped, not sent."""

_NOT_FORWARDED = (_HOP_BY_HOP - {"content-length"}) | {"authorization"}
"""Request headers a worker never sees: the caller's key, and the connection's own (the
body reaches the worker whole, so its length stays)."""


def request_headers(request: Request) -> dict[str, str]:
    """A request's headers as a worker gets them: repeated ones joined into one (``, ``; a
    cookie's with ``; ``, as RFC 9110 and 6265 have it), never ``_NOT_FORWARDED`` ones or
    those the request's ``Connection`` names."""
    connection = {n.strip().lower() for n in request.headers.get("connection", "").split(",")}
    headers: dict[str, str] = {}
    for name, value in request.headers.items():  # lower-case names, each occurrence
        if name in _NOT_FORWARDED or name in connection:
            continue
        if name in headers:
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value
    return headers


def _end_to_end(response: WorkerResponse) -> dict[str, str]:
    """A worker response's headers as the proxy passes them on: all but ``_HOP_BY_HOP``."""
    return {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}


async def _rpc_arguments(
    request: Request, worker_id: str, method: str
) -> tuple[list[Any], dict[str, Any]] | str:
    """An rpc request's ``(args, kwargs)``, or what is wrong with it: a body that is not
    ``{"args": [...], "kwargs": {...}}`` or a list of args, one that sets ``props`` (only the
    host sets them), or ``fetch`` (the fetch proxy's)."""
    expected = 'the body must be {"args": [...], "kwargs": {...}} or a list of args'
    try:
        raw = await request.json() if await request.body() else {}
    except ValueError as exc:  # not JSON, or not UTF-8
        return f"{expected}; it is not JSON: {exc}"
    except RecursionError:
        return f"{expected}; it is nested too deeply"
    if isinstance(raw, list):
        args, kwargs = raw, {}
    elif isinstance(raw, dict):
        if "props" in raw:
            return (
                "props cannot be sent over HTTP: a worker trusts its ctx.props as the "
                "host's (the Loader API's get_entrypoint(name, props=...) sets them)"
            )
        unknown = sorted(set(raw) - {"args", "kwargs"})
        if unknown:
            return f"{expected}; unknown field(s): {', '.join(unknown)}"
        args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    else:
        return f"{expected}, not {type(raw).__name__}"
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return f'{expected}: "args" must be a list and "kwargs" an object'
    if method == "fetch":  # its argument is a request, its answer a response: HTTP's
        where = f"/workers/{worker_id}/fetch/{{path}}"
        return f"fetch is not an RPC method here: send the request to {where}"
    return args, kwargs


def _log(
    state: dict[str, Any],
    caller: Caller,
    kind: str,
    worker_id: str,
    status: int,
    started: float,
    body: dict[str, Any],
    cpu_ms: float,
) -> None:
    error = body.get("error")
    state["store"].log(
        caller,
        kind,
        status,
        (time.perf_counter() - started) * 1000,
        cpu_ms=cpu_ms,
        worker=worker_id,
        error_type=error.get("type") if error else None,
        logs=body.get("logs", []),
    )
