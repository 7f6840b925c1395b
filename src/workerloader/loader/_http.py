"""The host's ``Request`` and ``Response``, in the Fetch API's shape."""

from __future__ import annotations

import json as _json
from collections.abc import Mapping
from typing import Any

from ..rpc import RpcTarget

__all__ = ["Request", "Response"]


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
    ``await text()``, ``await json()`` or ``await bytes()``. It crosses to a worker by
    reference (worker-to-worker fetch), where its properties are read with ``await``."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self._status = status
        self._headers = dict(headers)
        self.body = body

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    async def bytes(self) -> bytes:
        return self.body

    async def text(self) -> str:
        return self.body.decode()

    async def json(self) -> Any:
        return _json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
