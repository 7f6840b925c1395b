"""The worker fetch proxy as the plain ASGI front routes it, ahead of FastAPI.

``/workers/{id}/fetch/{path}`` for the proxied methods goes straight to the handler; anything
else (other methods, other paths) still goes through FastAPI. An echo worker reports what
reached it, and keeps a list of every request it saw so a test can tell one never arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

from tests.server._keys import bearer
from workerloader.server import _app
from workerloader.server._store import ServiceStore

from .conftest import address

ECHO = """
from urllib.parse import urlsplit

from workers import WorkerEntrypoint, Response

SEEN = []


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        body = await request.bytes()
        url = urlsplit(request.url)
        SEEN.append(f"{request.method} {url.path}")
        return Response.json(
            {
                "method": request.method,
                "url": request.url,
                "host": url.netloc,
                "path": url.path,
                "query": url.query,
                "length": len(body),
                "body": body[:100].decode(),
                "headers": request.headers,
            },
            status=201 if request.method == "PUT" else 200,
            headers={"x-echo": "yes"},
        )


class Seen(WorkerEntrypoint):
    async def requests(self):
        return SEEN
"""

DEFINITION = {"main_module": "main.py", "modules": {"main.py": ECHO}}
MAX_BODY = 1 << 20
PROXIED = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


async def put_echo(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
    put = await client.put("/workers/echo", json=DEFINITION, headers=headers)
    assert put.status_code == 200, put.text


async def seen(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> list[str]:
    """The requests the echo worker's fetch has seen (asked over the RPC endpoint)."""
    answer = await client.post("/workers/echo/rpc/Seen/requests", json=[], headers=headers)
    assert answer.status_code == 200, answer.text
    requests: list[str] = answer.json()["result"]
    return requests


@pytest.fixture
async def echo(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The service's client, with the echo worker stored (dev mode: no keys)."""
    await put_echo(client)
    return client


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_each_method_reaches_the_worker_with_path_query_and_body(
    echo: httpx.AsyncClient, method: str
) -> None:
    body = f"{method.lower()} body ✓".encode()
    response = await echo.request(
        method, "/workers/echo/fetch/a/b/c?x=1&y=two%20words", content=body
    )
    assert response.status_code == (201 if method == "PUT" else 200), response.text
    assert response.headers["x-echo"] == "yes"
    assert response.headers["content-type"] == "application/json"
    got: dict[str, Any] = response.json()
    assert got["method"] == method
    assert got["host"] == "echo"
    assert got["path"] == "/a/b/c"
    assert got["query"] == "x=1&y=two%20words"
    assert got["url"] == "https://echo/a/b/c?x=1&y=two%20words"
    assert got["body"] == body.decode()
    assert got["length"] == len(body)
    assert await seen(echo) == [f"{method} /a/b/c"]


async def test_the_path_reaches_the_worker_as_the_client_encoded_it(
    echo: httpx.AsyncClient,
) -> None:
    # %2F stays inside one segment, %3F is no query, %20 no space: decoded, each would
    # change what the worker is asked for.
    response = await echo.get("/workers/echo/fetch/files/a%2Fb/what%3Fnot%20this?q=1")
    got = response.json()
    assert got["url"] == "https://echo/files/a%2Fb/what%3Fnot%20this?q=1"
    assert (got["path"], got["query"]) == ("/files/a%2Fb/what%3Fnot%20this", "q=1")


async def test_head_and_options_are_proxied_too(echo: httpx.AsyncClient) -> None:
    head = await echo.head("/workers/echo/fetch/h")
    assert head.status_code == 200
    assert head.headers["x-echo"] == "yes"
    assert head.content == b""
    options = await echo.options("/workers/echo/fetch/o")
    assert options.status_code == 200
    assert options.json()["method"] == "OPTIONS"
    assert await seen(echo) == ["HEAD /h", "OPTIONS /o"]


async def test_the_path_may_be_empty_and_the_query_absent(echo: httpx.AsyncClient) -> None:
    response = await echo.get("/workers/echo/fetch/")
    assert response.status_code == 200
    got = response.json()
    assert got["url"] == "https://echo/"
    assert (got["path"], got["query"], got["length"]) == ("/", "", 0)


async def test_the_request_headers_reach_the_worker(echo: httpx.AsyncClient) -> None:
    response = await echo.get("/workers/echo/fetch/h", headers={"x-custom": "42"})
    assert response.json()["headers"]["x-custom"] == "42"


async def test_an_unknown_worker_is_404_with_the_usual_error_shape(
    echo: httpx.AsyncClient,
) -> None:
    not_found = {"ok": False, "error": {"type": "NotFound", "message": "no worker 'nope'"}}
    described = await echo.get("/workers/nope")  # the same error from a FastAPI route
    assert described.status_code == 404
    assert described.json() == not_found
    for method in PROXIED:
        proxied = await echo.request(method, "/workers/nope/fetch/a/b?q=1", content=b"x")
        assert proxied.status_code == 404, method
        assert proxied.headers["content-type"] == "application/json"
        if method != "HEAD":
            assert proxied.json() == not_found
    assert await seen(echo) == []


async def test_a_method_the_proxy_does_not_route_never_reaches_the_worker(
    echo: httpx.AsyncClient,
) -> None:
    for method in ("TRACE", "PROPFIND"):
        response = await echo.request(method, "/workers/echo/fetch/a/b")
        assert response.status_code == 405, (method, response.text)
    assert await seen(echo) == []
    assert (await echo.get("/workers/echo/fetch/a/b")).status_code == 200
    assert await seen(echo) == ["GET /a/b"]


async def test_paths_next_to_the_proxy_are_not_routed_to_it(echo: httpx.AsyncClient) -> None:
    assert (await echo.get("/workers/echo/fetchx/a")).status_code == 404
    assert (await echo.get("/workers/echo/other/a")).status_code == 404
    assert (await echo.get("/workers//fetch/a")).status_code == 404
    described = await echo.get("/workers/echo")  # the FastAPI route behind the front
    assert described.status_code == 200
    assert described.json()["main_module"] == "main.py"
    assert await seen(echo) == []


async def raw_request(client: httpx.AsyncClient, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, no body) on a fresh connection to the service;
    the response's status and body. Blocks until the server answers: a server that waited for
    the body it was promised would never answer (and the test would time out)."""
    reader, writer = await asyncio.open_connection(*address(client))
    try:
        writer.write(head)
        await writer.drain()
        status_and_headers = await reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers["content-length"]))
        return status, body
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_body_declared_over_1_mib_is_413_before_the_worker_sees_it(
    echo: httpx.AsyncClient,
) -> None:
    head = (
        b"POST /workers/echo/fetch/big HTTP/1.1\r\n"
        b"host: 127.0.0.1\r\n"
        b"content-type: application/octet-stream\r\n"
        b"content-length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n"
    )
    status, body = await raw_request(echo, head)  # the body itself is never sent
    assert status == 413
    assert httpx.Response(413, content=body).json() == {
        "ok": False,
        "error": {"type": "PayloadTooLarge", "message": f"bodies are limited to {MAX_BODY} bytes"},
    }

    sent = await echo.put("/workers/echo/fetch/big", content=b"x" * (MAX_BODY + 1))
    assert sent.status_code == 413
    assert sent.json()["error"]["type"] == "PayloadTooLarge"
    assert await seen(echo) == []

    under_the_cap = await echo.post("/workers/echo/fetch/big", content=b"y" * (MAX_BODY // 2))
    assert under_the_cap.status_code == 200, under_the_cap.text[:500]
    assert under_the_cap.json()["length"] == MAX_BODY // 2
    assert await seen(echo) == ["POST /big"]


async def test_with_a_key_the_proxy_needs_it(served: tuple[httpx.AsyncClient, Path]) -> None:
    client, data_dir = served
    key = ServiceStore(data_dir).create_key("alice", "team-a")
    alice = bearer(key)
    await put_echo(client, alice)

    for method in PROXIED:
        anonymous = await client.request(method, "/workers/echo/fetch/a")
        assert anonymous.status_code == 401, method
        assert anonymous.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":
            assert anonymous.json()["error"]["type"] == "Unauthorized"
        wrong = {"authorization": "Bearer wl_not-a-key"}
        refused = await client.request(method, "/workers/echo/fetch/a", headers=wrong)
        assert refused.status_code == 401, method
        allowed = await client.request(method, "/workers/echo/fetch/a", headers=alice)
        assert allowed.status_code == (201 if method == "PUT" else 200), method
    assert await seen(client, alice) == [f"{method} /a" for method in PROXIED]

    forwarded = (await client.get("/workers/echo/fetch/a", headers=alice)).json()
    assert "authorization" not in forwarded["headers"]  # the key stays with the service


@pytest.fixture
def front_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every request the front routes to the fetch handler itself, as "METHOD path" (it wraps
    each in a ``Request`` of its own; FastAPI's routes make theirs elsewhere)."""
    made: list[str] = []

    class SpiedRequest(Request):
        def __init__(self, scope: Any, receive: Any) -> None:
            super().__init__(scope, receive)
            made.append(f"{scope['method']} {scope['path']}")

    monkeypatch.setattr(_app, "Request", SpiedRequest)
    return made


async def test_the_front_routes_the_proxy_and_fastapis_routes_answer_the_same(
    echo: httpx.AsyncClient, front_requests: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [
        ("GET", "/workers/echo/fetch/a/b?x=1", b""),
        ("POST", "/workers/echo/fetch/p", b"posted"),
        ("PATCH", "/workers/echo/fetch/", b"{}"),
        ("GET", "/workers/nope/fetch/x", b""),
        ("TRACE", "/workers/echo/fetch/t", b""),
    ]

    async def answers() -> list[tuple[int, str, str | None]]:
        got = []
        for method, url, body in requests:
            response = await echo.request(method, url, content=body)
            got.append((response.status_code, response.text, response.headers.get("x-echo")))
        return got

    through_the_front = await answers()
    assert [status for status, _, _ in through_the_front] == [200, 200, 200, 404, 405]
    assert front_requests == [
        "GET /workers/echo/fetch/a/b",
        "POST /workers/echo/fetch/p",
        "PATCH /workers/echo/fetch/",
        "GET /workers/nope/fetch/x",
    ]

    # The same requests with the front routing nothing: FastAPI's routes (kept for the OpenAPI
    # document) call the same handler, so the answers do not change.
    monkeypatch.setattr(_app, "FETCH_METHODS", ())
    assert await answers() == through_the_front
    assert len(front_requests) == 4
    assert await seen(echo) == ["GET /a/b", "POST /p", "PATCH /"] * 2


async def test_the_openapi_document_still_lists_the_fetch_operations(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    operations = spec["paths"]["/workers/{worker_id}/fetch/{path}"]
    assert {method: operations[method]["operationId"] for method in operations} == {
        method.lower(): f"fetch_worker_{method.lower()}" for method in PROXIED
    }
    parameters = {p["name"]: p["in"] for p in operations["get"]["parameters"]}
    assert parameters == {"worker_id": "path", "path": "path"}


@pytest.mark.parametrize("path", ["/workers/echo/fetch/big", "/execute", "/workers/other"])
async def test_a_chunked_body_over_1_mib_is_413_wherever_it_goes(
    echo: httpx.AsyncClient, path: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no length declared: sent chunked
        for _ in range(3):
            yield b"x" * (MAX_BODY // 2)

    method = "PUT" if path == "/workers/other" else "POST"
    sent = await echo.request(method, path, content=chunks())
    assert sent.request.headers.get("transfer-encoding") == "chunked"
    assert sent.status_code == 413
    assert sent.json()["error"]["type"] == "PayloadTooLarge"
    assert await seen(echo) == []
    assert (await echo.get("/workers/other")).status_code == 404  # nothing was stored
