"""Outbound HTTP for workers: ``HttpGateway`` performs a worker's ``fetch`` on the host.

SSRF-safe: only allow-listed hosts; the name is resolved here and every address checked
(loopback, private, link-local, multicast, reserved and cloud-metadata addresses are refused
unless ``allow_private``); the connection goes to the checked address (TLS still verifies the
name); every redirect hop is checked the same way; responses are size- and time-limited.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import httpx

from .._errors import BindingError, PermissionDenied
from ..rpc import RpcTarget

__all__ = ["HttpGateway"]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_HOP_HEADERS: Final = frozenset({"host", "connection", "content-length", "transfer-encoding"})


class HttpGateway(RpcTarget):
    """``global_outbound=HttpGateway(allow=["api.example.com", "*.example.org"])``."""

    def __init__(
        self,
        allow: Sequence[str],
        *,
        allow_private: bool = False,
        max_response_bytes: int = (4 << 20) - (64 << 10),
        timeout_s: float = 30.0,
        max_redirects: int = 5,
    ) -> None:
        self._allow = [pattern.lower() for pattern in allow]
        self._allow_private = allow_private
        self._max_bytes = max_response_bytes
        self._timeout = timeout_s
        self._max_redirects = max_redirects

    def _allowed_host(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self._allow)

    async def _checked_address(self, host: str, port: int) -> str:
        """Resolve ``host`` and return an address every check passed."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise BindingError(f"cannot resolve {host}: {exc.strerror}") from None
        addresses = {str(info[4][0]) for info in infos}
        for address in addresses:
            ip = ipaddress.ip_address(address)
            public = ip.is_global and not ip.is_multicast
            if not public and not self._allow_private:
                raise PermissionDenied(
                    f"{host} resolves to {address}, a non-public address; outbound requests "
                    "may only reach public addresses"
                )
        return sorted(addresses)[0]

    async def fetch(self, request: dict[str, Any]) -> dict[str, Any]:
        """Perform ``request`` (``{"url", "method", "headers", "body"}``); the response as
        ``{"status", "headers", "body", "url"}``."""
        method = str(request.get("method", "GET")).upper()
        url = str(request["url"])
        headers = {
            str(k): str(v)
            for k, v in dict(request.get("headers") or {}).items()
            if str(k).lower() not in _HOP_HEADERS
        }
        body = request.get("body") or b""
        if not isinstance(body, bytes):
            raise BindingError("the request body must be bytes")
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
            for _ in range(self._max_redirects + 1):
                parts = urlsplit(url)
                host = (parts.hostname or "").lower()
                if parts.scheme not in ("http", "https") or not host:
                    raise PermissionDenied(f"only http and https URLs can be fetched: {url!r}")
                if not self._allowed_host(host):
                    raise PermissionDenied(
                        f"{host} is not in this worker's outbound allow-list {self._allow}"
                    )
                port = parts.port or (443 if parts.scheme == "https" else 80)
                address = await self._checked_address(host, port)
                target = parts._replace(
                    netloc=f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                ).geturl()
                default_port = port == (443 if parts.scheme == "https" else 80)
                host_header = host if default_port else f"{host}:{port}"
                response = await self._send(
                    client, method, target, host, host_header, headers, body
                )
                location = response["headers"].get("location")
                if response["status"] not in _REDIRECTS or location is None:
                    response["url"] = url
                    return response
                url = urljoin(url, location)
                if response["status"] == 303:
                    method, body = "GET", b""
            raise BindingError(f"more than {self._max_redirects} redirects")

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        target: str,
        host: str,
        host_header: str,
        headers: dict[str, str],
        body: bytes,
    ) -> dict[str, Any]:
        request = client.build_request(
            method,
            target,
            headers={**headers, "host": host_header},
            content=body,
            extensions={"sni_hostname": host},
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise BindingError(f"outbound request failed: {exc}") from None
        try:
            chunks, size = [], 0
            # Decoded bytes (gzip and deflate undone), counted as they come: a small compressed
            # answer that inflates past the cap is cut off too.
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_bytes:
                    raise BindingError(
                        f"the response is larger than the limit of {self._max_bytes} bytes"
                    )
                chunks.append(chunk)
        finally:
            await response.aclose()
        return {
            "status": response.status_code,
            "headers": {
                k.lower(): v
                for k, v in response.headers.items()
                if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
            },
            "body": b"".join(chunks),
        }
