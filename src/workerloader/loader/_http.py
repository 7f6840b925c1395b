"""The host's ``Request`` and ``Response``, in the Fetch API's shape."""

from __future__ import annotations

import json as _json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from .._errors import OutputLimitExceeded
from ..rpc import RpcTarget
from ..runtime._main import SESSION_LIMITS

__all__ = ["STREAM_BYTES_MAX", "Request", "Response"]

STREAM_BYTES_MAX = SESSION_LIMITS.max_frame_bytes - (64 << 10)
"""The most of a streamed body ``Response.bytes()`` (and ``text()``, ``json()``) holds: what one
message carries, as for a body sent whole, so that a worker reading another's body this way
gets OutputLimitExceeded rather than an oversized message."""


class Request:
    """``Request(url, method="GET", headers=None, body=None)``."""

    def __init__(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
    ) -> None:
        self.url = url
        self.method = method.upper()
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body.encode() if isinstance(body, str) else (body or b"")

    def to_wire(self) -> dict[str, object]:
        return {"url": self.url, "method": self.method, "headers": self.headers, "body": self.body}


class Response(RpcTarget):
    """What a worker's ``fetch`` answered: ``status``, ``headers``, and the body through
    ``await text()``, ``await json()`` or ``await bytes()``, or chunk by chunk as the worker
    streams it (``async for chunk in response.chunks()``). It crosses to a worker by reference
    (worker-to-worker fetch), where its properties are read with ``await``."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        read: Callable[[], Awaitable[bytes]] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """``read`` (a streamed body) gives its next bytes, ``b""`` at the end; ``release`` is
        called once the stream is done with, read to the end or not."""
        self._status = status
        self._headers = dict(headers)
        self.body = body
        self._read = read
        self._release = release
        self.cpu_ms = 0.0
        """CPU time the worker used making this response: its fetch call's, and, once a
        streamed body has been read (or discarded), the stream's as well."""

    @property
    def streaming(self) -> bool:
        """True while the body is a stream not yet read (``chunks()`` reads it)."""
        return self._read is not None

    def discard(self) -> None:
        """Release a streamed body without reading it (the worker's generator closes)."""
        self._read = None
        release, self._release = self._release, None
        if release is not None:
            release()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body's bytes as the worker produces them (all at once if it sent them so).
        Reads the stream once; leaving early releases it (the worker's generator closes)."""
        read, self._read = self._read, None
        if read is None:
            if self.body:
                yield self.body
            return
        try:
            while chunk := await read():
                yield chunk
        finally:
            self.discard()

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    async def bytes(self) -> bytes:
        """The whole body. A streamed one is read to its end, up to ``STREAM_BYTES_MAX``
        (OutputLimitExceeded past it: a worker may stream without end, and this holds it
        all in memory; ``chunks()`` reads any length, within the fetch's limits)."""
        if self._read is not None:
            parts, size = [], 0
            chunks = self.chunks()
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > STREAM_BYTES_MAX:
                        raise OutputLimitExceeded(
                            f"the streamed body is over {STREAM_BYTES_MAX} bytes; read it "
                            "with chunks() to take more"
                        )
                    parts.append(chunk)
            finally:
                await chunks.aclose()  # releases the worker's stream now, not when collected
            self.body = b"".join(parts)
        return self.body

    async def text(self) -> str:
        return (await self.bytes()).decode()

    async def json(self) -> Any:
        return _json.loads(await self.bytes())

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
