"""The ``workers`` module as user code sees it (``from workers import WorkerEntrypoint``).

Mirrors Cloudflare's Python Workers: ``WorkerEntrypoint(ctx, env)`` with a new instance per call,
``Request``/``Response`` in the Fetch API's shape, and ``fetch`` for outbound HTTP.
"""

from __future__ import annotations

import json as _json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Mapping
from typing import Any, cast

from .._http_rules import response_problem as _response_problem
from ..rpc import RpcTarget

__all__ = [
    "Context",
    "Env",
    "HTTPError",
    "Request",
    "Response",
    "WorkerEntrypoint",
    "fetch",
    "modules",
    "sdk",
]

modules: dict[str, object] = {}
"""The worker's data modules by name: ``{"json": ...}`` parsed, ``{"text": ...}`` as str,
``{"data": ...}`` as bytes (``workers.modules["config.json"]``)."""


class Env:
    """The worker's bindings, by attribute (``env.KV``) or item (``env["KV"]``)."""

    def __init__(self, values: Mapping[str, object]) -> None:
        self.__dict__.update(values)

    def __getitem__(self, name: str) -> Any:
        try:
            return self.__dict__[name]
        except KeyError:
            raise KeyError(name) from None

    def __getattr__(self, name: str) -> Any:  # only for names it does not hold
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"env has no {name!r}: the worker's env holds {sorted(self.__dict__) or 'nothing'} "
            "(its data and bindings, as the host gave them)"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.__dict__

    def __repr__(self) -> str:
        return f"Env({sorted(self.__dict__)})"


class Context:
    """Per-call context: ``props`` set by the host, ``wait_until`` for work after the reply."""

    def __init__(self, props: Mapping[str, object] | None = None) -> None:
        self.props: dict[str, object] = dict(props or {})
        self._waiting: list[Awaitable[object]] = []

    def wait_until(self, awaitable: Awaitable[object]) -> None:
        """Keep the worker running ``awaitable`` after the response is sent."""
        self._waiting.append(awaitable)

    waitUntil = wait_until  # Cloudflare's spelling


class WorkerEntrypoint:
    """Base class of entrypoints. ``fetch(request)`` answers HTTP; other public async methods are
    RPC methods callable from the host."""

    def __init__(self, ctx: Context, env: Env) -> None:
        self.ctx = ctx
        self.env = env


def _headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> dict[str, str]:
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k).lower(): str(v) for k, v in items}


class Request:
    """An HTTP request: ``method``, ``url``, ``headers``, and the body via ``await text()``,
    ``await json()`` or ``await bytes()``."""

    def __init__(
        self,
        url: str,
        method: str = "GET",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes | str | None = None,
    ) -> None:
        self.url = url
        self.method = method.upper()
        self.headers = _headers(headers)
        self._body = body.encode() if isinstance(body, str) else (body or b"")

    async def bytes(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return self._body.decode()

    async def json(self) -> Any:
        return _json.loads(self._body)

    def to_wire(self) -> dict[str, object]:
        return {"url": self.url, "method": self.method, "headers": self.headers, "body": self._body}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Request:
        return cls(data["url"], data["method"], data["headers"], data["body"])


class _JsonMethod:
    """``Response.json`` as the Fetch API has it, both ways: on the class it makes a JSON
    response (``Response.json(data, status=200, headers=None)``), on a response it reads the
    body as JSON (``await response.json()``, after ``fetch``)."""

    def __get__(self, response: Response | None, cls: type[Response]) -> Any:
        if response is not None:
            return response._read_json

        def make(
            data: object, status: int = 200, headers: Mapping[str, str] | None = None
        ) -> Response:
            merged = {"content-type": "application/json", **(headers or {})}
            return cls(_json.dumps(data), status=status, headers=merged)

        return make


class Response:
    """An HTTP response: ``Response(body, status=200, headers=None)``; ``Response.json(data)``
    makes one of JSON, ``await response.json()`` reads one.

    ``body`` is bytes, text, or an async iterable of either (an async generator, say): then the
    body streams, each chunk sent to the caller as it is produced, and the caller may read the
    first chunks before the last one exists. A body over 1 MiB given whole streams too, so a
    response may be of any size (the service caps none)."""

    def __init__(
        self,
        body: bytes | str | AsyncIterable[bytes | str] | None = None,
        status: int = 200,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.headers = _headers(headers)
        problem = _response_problem(status, self.headers)
        if problem is not None:
            raise ValueError(f"Response: {problem}")
        if isinstance(body, str):
            self.headers.setdefault("content-type", "text/plain;charset=UTF-8")
        self._stream: AsyncIterable[bytes | str] | None = None
        if body is None or isinstance(body, (bytes, bytearray, str)):
            pass  # the usual case first: an ABC check costs more
        elif isinstance(body, AsyncIterable):
            self._stream, body = body, None
        else:
            raise TypeError(
                "Response body must be bytes, str, or an async iterable of them, "
                f"not {type(body).__name__}"
            )
        self._body = body.encode() if isinstance(body, str) else bytes(body or b"")

    json: Any = _JsonMethod()

    async def bytes(self) -> bytes:
        if self._stream is not None:  # read to its end, once
            stream, self._stream = _BodyStream(self._stream), None
            parts = []
            while chunk := await stream.read():
                parts.append(chunk)
            self._body = b"".join(parts)
        return self._body

    async def text(self) -> str:
        return (await self.bytes()).decode()

    async def _read_json(self) -> Any:
        return _json.loads(await self.bytes())

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {"status": self.status, "headers": self.headers}
        if self._stream is not None:  # the caller pulls it: a capability, read chunk by chunk
            wire["body"] = b""
            wire["stream"] = _BodyStream(self._stream)
        elif len(self._body) > _INLINE_MAX:  # one message would not carry it: streamed too
            wire["body"] = b""
            wire["stream"] = _BodyStream(_once(self._body))
        else:
            wire["body"] = self._body
        return wire


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class _BodyStream(RpcTarget):
    """A streamed body as the caller reads it: ``await read()`` gives the next bytes, at most
    ``_CHUNK_MAX`` at a time (so each fits a message), and ``b""`` at the end. The caller
    dropping it closes the iterable (an async generator's ``finally`` runs)."""

    def __init__(self, chunks: AsyncIterable[bytes | str]) -> None:
        self._chunks: AsyncIterator[bytes | str] = aiter(chunks)
        self._pending = memoryview(b"")  # the rest of the current chunk, not copied

    async def read(self) -> bytes:
        while not self._pending:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return b""
            if isinstance(chunk, str):
                chunk = chunk.encode()
            elif not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"a streamed body must yield bytes or str, not {type(chunk).__name__}"
                )
            self._pending = memoryview(bytes(chunk))
        # A view of the rest: slicing bytes copied what remained at every read (64 MiB
        # given whole took 4 s to stream).
        data, self._pending = self._pending[:_CHUNK_MAX], self._pending[_CHUNK_MAX:]
        return bytes(data)


_CHUNK_MAX = 256 * 1024
_INLINE_MAX = 1 << 20
"""A body up to this goes in the answer itself; a larger one streams, in ``_CHUNK_MAX``
parts (a message carries at most 4 MiB)."""


_outbound: Any = None  # the worker's global_outbound capability, set by the runtime at load


async def fetch(
    url: str | Request,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | str | None = None,
) -> Response:
    """Outbound HTTP through the worker's ``global_outbound``. With ``global_outbound=None``
    (the default) there is no network at all and this raises PermissionError."""
    if _outbound is None:
        raise PermissionError(
            "This worker has no outbound network: its WorkerCode sets global_outbound=None, "
            "so fetch() and sockets are disabled. HTTP goes through a binding the host gives "
            "instead (in the service: api, or sdk.api, when it has an HTTP gateway)."
        )
    request = url if isinstance(url, Request) else Request(url, method, headers, body)
    wire = await _outbound.fetch(request.to_wire())
    return Response(wire["body"], status=wire["status"], headers=wire["headers"])


class CallerContext(dict[str, Any]):
    """``sdk.context``: who the caller is, as the host bound it: ``context.namespace`` (or
    ``context["namespace"]``), ``user_id``, ``authenticated`` and ``permissions``. A dict, so
    it is data: ``return context`` answers it. Changing it changes nothing the host checks."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        permissions = data.get("permissions", ())
        super().__init__(
            user_id=data.get("user_id"),
            namespace=data.get("namespace", "default"),
            authenticated=bool(data.get("authenticated", False)),
            permissions=(
                {k: tuple(v) for k, v in permissions.items()}
                if isinstance(permissions, Mapping)
                else tuple(permissions)
            ),
        )

    @property
    def user_id(self) -> str | None:
        return cast("str | None", self["user_id"])

    @property
    def namespace(self) -> str:
        return cast(str, self["namespace"])

    @property
    def authenticated(self) -> bool:
        return cast(bool, self["authenticated"])

    @property
    def permissions(self) -> tuple[str, ...] | dict[str, tuple[str, ...]]:
        """("read", "write")-style for every store, or per store."""
        return cast("tuple[str, ...] | dict[str, tuple[str, ...]]", self["permissions"])

    def __repr__(self) -> str:
        return f"CallerContext({dict.__repr__(self)})"


class HTTPError(Exception):
    """``sdk.api.get``/``post``: the server answered with a status outside 200–299. ``method``,
    ``url``, ``status`` and ``body`` (parsed as JSON, else text) tell what it said; ``fetch``
    hands any answer back as a ``Response`` instead."""

    def __init__(self, method: str, url: str, status: int, body: Any) -> None:
        said = body if isinstance(body, str) else _json.dumps(body)
        super().__init__(f"{method} {url} answered {status}: {said[:200]}")
        self.method = method
        self.url = url
        self.status = status
        self.body = body


class Api:
    """``sdk.api``: outbound HTTP through the host's gateway (allow-listed, SSRF-checked)."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = gateway

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
    ) -> Response:
        wire = await self._gateway.fetch(Request(url, method, headers, body).to_wire())
        return Response(wire["body"], status=wire["status"], headers=wire["headers"])

    async def get(self, url: str, headers: Mapping[str, str] | None = None) -> Any:
        """GET ``url``: the answer's body parsed as JSON, else its text. Raises ``HTTPError``
        for a status outside 200–299 (a 404's page is not data)."""
        return await _decoded("GET", url, await self.fetch(url, headers=headers))

    async def post(self, url: str, json: object, headers: Mapping[str, str] | None = None) -> Any:
        """POST ``json`` to ``url`` as JSON; the answer as ``get`` gives it."""
        merged = {"content-type": "application/json", **(headers or {})}
        response = await self.fetch(url, method="POST", headers=merged, body=_json.dumps(json))
        return await _decoded("POST", url, response)


async def _decoded(method: str, url: str, response: Response) -> Any:
    text = await response.text()
    try:
        body: Any = _json.loads(text)
    except ValueError:
        body = text
    if not 200 <= response.status < 300:
        raise HTTPError(method, url, response.status, body)
    return body


class Sdk:
    """``from workers import sdk``: the platform's runtime, built from the worker's bindings.

    ``sdk.db`` (document collections), ``sdk.kv``, ``sdk.sql``, ``sdk.context``, and whatever
    else the host put in ``env["SDK"]``. Each is a stub whose calls the host checks.
    """

    def __init__(self) -> None:
        self._bindings: dict[str, Any] = {}

    def _bind(self, bindings: Mapping[str, Any] | None) -> None:
        self._bindings = dict(bindings or {})
        if "context" in self._bindings:
            self._bindings["context"] = CallerContext(self._bindings["context"])
        if self._bindings.get("api") is not None:
            self._bindings["api"] = Api(self._bindings["api"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._bindings[name]
        except KeyError:
            bound = sorted(k for k, v in self._bindings.items() if v is not None)
            raise AttributeError(
                f"sdk.{name} is not available to this worker: the host did not bind it "
                f"(it binds {bound or 'nothing'} via env['SDK'])"
            ) from None


sdk = Sdk()
