"""Outbound HTTP through ``HttpGateway`` against a real server on 127.0.0.1: allow-list and
wildcards, refusal of non-public addresses, every redirect hop checked, size and time limits,
schemes; and ``workers.fetch`` / ``sdk.api`` from a worker in the real sandbox.

Every server here listens on 127.0.0.1 only, and every request to any other address is refused
by the gateway before it connects."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from tests.bindings._helpers import DESCRIBE, exact
from workerloader import Loader, WorkerCode, WorkerError
from workerloader._errors import BindingError, PermissionDenied
from workerloader.bindings import HttpGateway


@dataclass(frozen=True)
class Seen:
    """A request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, dict[str, str], bytes]
HANG: Final[Reply] = (0, {}, b"")  # a route answering this never answers


class LoopbackServer:
    """A minimal HTTP/1.1 server on 127.0.0.1: one request per connection, replies by path."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, path: str, status: int, body: bytes = b"", **headers: str) -> None:
        self.routes[path] = lambda _: (
            status,
            {k.replace("_", "-"): v for k, v in headers.items()},
            body,
        )

    def paths(self) -> list[str]:
        return [seen.path for seen in self.seen]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")[:-2]
            method, path, _ = request_line.split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen = Seen(method, path, headers, body)
            self.seen.append(seen)
            route = self.routes.get(path.partition("?")[0])
            reply = route(seen) if route is not None else (404, {}, b"no such path")
            if reply is HANG:
                await self._stop.wait()
                return
            status, reply_headers, reply_body = reply
            out = [f"HTTP/1.1 {status} Status"]
            out += [f"{name}: {value}" for name, value in reply_headers.items()]
            out += [f"Content-Length: {len(reply_body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(out).encode("latin-1") + reply_body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)


@pytest.fixture
async def server() -> AsyncIterator[LoopbackServer]:
    server = LoopbackServer()
    await server.start()
    server.route("/hello", 200, b"hello from loopback", content_type="text/plain", x_served_by="t")
    server.route("/json", 200, b'{"items": [1, 2], "ok": true}', content_type="application/json")
    server.routes["/echo"] = lambda seen: (
        200,
        {"content-type": "application/json"},
        json.dumps(
            {"method": seen.method, "headers": seen.headers, "body": seen.body.decode()}
        ).encode(),
    )
    server.routes["/hang"] = lambda _: HANG
    try:
        yield server
    finally:
        await server.close()


def loopback(**options: Any) -> HttpGateway:
    return HttpGateway(["127.0.0.1"], allow_private=True, **options)


async def get(gateway: HttpGateway, url: str, **request: Any) -> dict[str, Any]:
    return await gateway.fetch({"url": url, **request})


# ---------------------------------------------------------------------------------------------
# Allowed requests


async def test_an_allowed_loopback_host_answers_with_status_headers_and_body(
    server: LoopbackServer,
) -> None:
    response = await get(loopback(), f"{server.base}/hello")
    assert response["status"] == 200
    assert response["headers"]["content-type"] == "text/plain"
    assert response["headers"]["x-served-by"] == "t"
    assert response["body"] == b"hello from loopback"
    assert response["url"] == f"{server.base}/hello"
    assert server.paths() == ["/hello"]


async def test_an_error_status_is_an_answer_not_an_exception(server: LoopbackServer) -> None:
    server.route("/teapot", 418, b"short and stout")
    response = await get(loopback(), f"{server.base}/teapot")
    assert (response["status"], response["body"]) == (418, b"short and stout")
    response = await get(loopback(), f"{server.base}/nowhere?x=1")
    assert (response["status"], response["body"]) == (404, b"no such path")
    assert server.paths() == ["/teapot", "/nowhere?x=1"]


async def test_method_headers_and_body_reach_the_server_but_hop_headers_do_not(
    server: LoopbackServer,
) -> None:
    response = await get(
        loopback(),
        f"{server.base}/echo",
        method="put",
        headers={"X-Custom": "yes", "Host": "evil.example", "Content-Length": "999"},
        body=b"payload",
    )
    echoed = json.loads(response["body"])
    assert echoed["method"] == "PUT"
    assert echoed["body"] == "payload"
    assert echoed["headers"]["x-custom"] == "yes"
    assert echoed["headers"]["content-length"] == "7"
    assert echoed["headers"]["host"].split(":")[0] == "127.0.0.1"


async def test_the_host_header_carries_the_port_of_the_url(server: LoopbackServer) -> None:
    # RFC 9110 §7.2: Host is the target URI's authority, port included when it is not the
    # scheme's default (a server building absolute URLs from Host would otherwise drop it).
    response = await get(loopback(), f"{server.base}/echo")
    assert json.loads(response["body"])["headers"]["host"] == f"127.0.0.1:{server.port}"


async def test_a_body_that_is_not_bytes_is_a_binding_error(server: LoopbackServer) -> None:
    with pytest.raises(BindingError, match=r"^the request body must be bytes$"):
        await get(loopback(), f"{server.base}/echo", method="POST", body="text")
    assert server.seen == []


async def test_a_compressed_answer_reaches_the_caller_decoded(server: LoopbackServer) -> None:
    # The caller never asked for compression (httpx adds Accept-Encoding on its own): the body
    # it gets must be the content, not gzip bytes it cannot read.
    plain = b'{"compressed": false}' * 20

    def maybe_gzip(seen: Seen) -> Reply:
        if "gzip" in seen.headers.get("accept-encoding", ""):
            return (
                200,
                {"content-type": "application/json", "content-encoding": "gzip"},
                (gzip.compress(plain)),
            )
        return 200, {"content-type": "application/json"}, plain

    server.routes["/maybe-gzip"] = maybe_gzip
    response = await get(loopback(), f"{server.base}/maybe-gzip")
    assert response["body"] == plain


# ---------------------------------------------------------------------------------------------
# The allow-list


async def test_a_host_not_in_the_allow_list_is_refused_naming_it(server: LoopbackServer) -> None:
    gateway = HttpGateway(["example.com"], allow_private=True)
    with pytest.raises(
        PermissionDenied,
        match=exact("127.0.0.1 is not in this worker's outbound allow-list ['example.com']"),
    ):
        await get(gateway, f"{server.base}/hello")
    assert server.seen == []


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://evil.test/", "evil.test"),
        ("http://example.com.evil.test/", "example.com.evil.test"),
        ("http://evilexample.com/", "evilexample.com"),
        ("http://example.org/", "example.org"),
        ("http://api.example.com@evil.test/", "evil.test"),
        ("http://evil.test#@api.example.com/", "evil.test"),
        ("https://EVIL.test:443/path", "evil.test"),
    ],
)
async def test_hosts_that_only_resemble_allowed_ones_are_refused(url: str, host: str) -> None:
    gateway = HttpGateway(["api.example.com", "*.example.org", "example.com"], timeout_s=0.5)
    allowed = "['api.example.com', '*.example.org', 'example.com']"
    with pytest.raises(
        PermissionDenied,
        match=exact(f"{host} is not in this worker's outbound allow-list {allowed}"),
    ):
        await get(gateway, url)


async def test_wildcard_patterns_match_like_fnmatch(server: LoopbackServer) -> None:
    for pattern in ("127.0.0.*", "127.0.0.?", "127.*", "*"):
        response = await get(HttpGateway([pattern], allow_private=True), f"{server.base}/hello")
        assert response["body"] == b"hello from loopback"
    for pattern in ("127.0.0.", "127.0.0.?0", "*.127.0.0.1", "128.*"):
        with pytest.raises(PermissionDenied, match=r"^127\.0\.0\.1 is not in this worker's "):
            await get(HttpGateway([pattern], allow_private=True), f"{server.base}/hello")
    assert server.paths() == ["/hello"] * 4


async def test_host_names_and_patterns_are_matched_without_case(server: LoopbackServer) -> None:
    response = await get(
        HttpGateway(["LocalHost"], allow_private=True), f"http://LOCALHOST:{server.port}/hello"
    )
    assert response["status"] == 200
    assert response["url"] == f"http://LOCALHOST:{server.port}/hello"


# ---------------------------------------------------------------------------------------------
# Non-public addresses


async def test_an_allowed_name_resolving_to_loopback_is_refused_without_allow_private(
    server: LoopbackServer,
) -> None:
    with pytest.raises(
        PermissionDenied,
        match=r"^localhost resolves to (127\.0\.0\.1|::1), a non-public address; outbound "
        r"requests may only reach public addresses$",
    ):
        await get(HttpGateway(["localhost"]), f"http://localhost:{server.port}/hello")
    assert server.seen == []


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
async def test_every_spelling_of_a_non_public_address_is_refused(
    server: LoopbackServer, host: str, address: str
) -> None:
    gateway = HttpGateway(["*"], timeout_s=0.5)
    name = host.strip("[]")
    with pytest.raises(
        PermissionDenied,
        match=exact(
            f"{name} resolves to {address}, a non-public address; outbound requests may only "
            "reach public addresses"
        ),
    ):
        await get(gateway, f"http://{host}:{server.port}/hello")
    assert server.seen == []


# ---------------------------------------------------------------------------------------------
# Redirects


async def test_a_redirect_to_another_allowed_path_is_followed(server: LoopbackServer) -> None:
    server.route("/relative", 302, location="/hello")
    server.route("/absolute", 301, location=f"{server.base}/json")
    server.route("/twice", 307, location="/relative")
    response = await get(loopback(), f"{server.base}/relative")
    assert (response["status"], response["body"]) == (200, b"hello from loopback")
    assert response["url"] == f"{server.base}/hello"
    response = await get(loopback(), f"{server.base}/absolute")
    assert json.loads(response["body"]) == {"items": [1, 2], "ok": True}
    assert response["url"] == f"{server.base}/json"
    response = await get(loopback(), f"{server.base}/twice")
    assert response["url"] == f"{server.base}/hello"
    assert server.paths() == [
        "/relative",
        "/hello",
        "/absolute",
        "/json",
        "/twice",
        "/relative",
        "/hello",
    ]


async def test_a_303_turns_a_post_into_a_get_and_a_307_keeps_it(server: LoopbackServer) -> None:
    server.route("/see-other", 303, location="/echo")
    server.route("/temporary", 307, location="/echo")
    response = await get(loopback(), f"{server.base}/see-other", method="POST", body=b"data")
    assert json.loads(response["body"])["method"] == "GET"
    assert json.loads(response["body"])["body"] == ""
    response = await get(loopback(), f"{server.base}/temporary", method="POST", body=b"data")
    assert json.loads(response["body"])["method"] == "POST"
    assert json.loads(response["body"])["body"] == "data"


async def test_a_redirect_without_location_is_the_answer(server: LoopbackServer) -> None:
    server.route("/moved", 302, b"moved, but where?")
    response = await get(loopback(), f"{server.base}/moved")
    assert (response["status"], response["body"]) == (302, b"moved, but where?")
    assert server.paths() == ["/moved"]


@pytest.mark.parametrize(
    ("location", "message"),
    [
        (
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "169.254.169.254 is not in this worker's outbound allow-list ['127.0.0.1']",
        ),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "metadata.google.internal is not in this worker's outbound allow-list ['127.0.0.1']",
        ),
        (
            "http://localhost:{port}/hello",
            "localhost is not in this worker's outbound allow-list ['127.0.0.1']",
        ),
        ("file:///etc/passwd", "only http and https URLs can be fetched: 'file:///etc/passwd'"),
    ],
)
async def test_a_redirect_to_a_host_outside_the_allow_list_is_refused(
    server: LoopbackServer, location: str, message: str
) -> None:
    server.route("/escape", 302, location=location.format(port=server.port))
    with pytest.raises(PermissionDenied, match=exact(message)):
        await get(loopback(timeout_s=0.5), f"{server.base}/escape")
    assert server.paths() == ["/escape"]


async def test_too_many_redirects_are_a_binding_error(server: LoopbackServer) -> None:
    server.route("/loop", 302, location="/loop")
    with pytest.raises(BindingError, match=r"^more than 2 redirects$"):
        await get(loopback(max_redirects=2), f"{server.base}/loop")
    assert server.paths() == ["/loop"] * 3
    server.route("/a", 302, location="/b")
    server.route("/b", 302, location="/hello")
    response = await get(loopback(max_redirects=2), f"{server.base}/a")
    assert response["body"] == b"hello from loopback"


# ---------------------------------------------------------------------------------------------
# Limits and schemes


async def test_a_response_over_max_response_bytes_is_a_binding_error(
    server: LoopbackServer,
) -> None:
    server.route("/big", 200, b"x" * 5000)
    server.route("/fits", 200, b"y" * 1000)
    gateway = loopback(max_response_bytes=1000)
    with pytest.raises(
        BindingError, match=exact("the response is larger than the limit of 1000 bytes")
    ):
        await get(gateway, f"{server.base}/big")
    assert (await get(gateway, f"{server.base}/fits"))["body"] == b"y" * 1000


async def test_a_large_streamed_response_is_cut_off_at_the_limit(server: LoopbackServer) -> None:
    server.route("/huge", 200, b"z" * (8 << 20))
    with pytest.raises(
        BindingError, match=exact("the response is larger than the limit of 65536 bytes")
    ):
        await get(loopback(max_response_bytes=65536), f"{server.base}/huge")


async def test_a_server_that_never_answers_times_out(server: LoopbackServer) -> None:
    started = time.monotonic()
    with pytest.raises(BindingError, match=r"^outbound request failed: "):
        await get(loopback(timeout_s=0.3), f"{server.base}/hang")
    assert 0.25 <= time.monotonic() - started < 3
    assert server.paths() == ["/hang"]


async def test_a_closed_port_is_a_binding_error(server: LoopbackServer) -> None:
    await server.close()
    with pytest.raises(BindingError, match=r"^outbound request failed: "):
        await get(loopback(timeout_s=2), f"{server.base}/hello")


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1:70/",
        "ws://127.0.0.1/",
        "data:text/plain,hello",
        "127.0.0.1/hello",
        "http:///no-host",
        "",
    ],
)
async def test_urls_that_are_not_http_or_https_are_refused(url: str) -> None:
    gateway = HttpGateway(["*"], allow_private=True, timeout_s=0.5)
    with pytest.raises(
        PermissionDenied, match=exact(f"only http and https URLs can be fetched: {url!r}")
    ):
        await get(gateway, url)


# ---------------------------------------------------------------------------------------------
# From a worker in the real sandbox


WORKER = (
    """
from workers import HTTPError, WorkerEntrypoint, fetch, sdk

"""
    + DESCRIBE
    + """

async def answer(url, **options):
    r = await fetch(url, **options)
    return [r.status, r.headers.get("x-served-by"), await r.text()]


class Api(WorkerEntrypoint):
    async def get(self, url):
        return await answer(url)

    async def post(self, url, body):
        return await answer(url, method="POST", headers={"x-from": "worker"}, body=body)

    async def attempt(self, url):
        return await describe(answer(url))

    async def api_get(self, url):
        return await sdk.api.get(url)

    async def api_post(self, url, data):
        return await sdk.api.post(url, data)

    async def api_attempt(self, url):
        return await describe(sdk.api.get(url))

    async def api_refused(self, url):
        try:
            await sdk.api.post(url, {"n": 1})
        except HTTPError as exc:
            return [exc.method, exc.url, exc.status, exc.body, str(exc)]
"""
)

NO_NETWORK = (
    "This worker has no outbound network: its WorkerCode sets global_outbound=None, "
    "so fetch() and sockets are disabled. HTTP goes through a binding the host gives "
    "instead (in the service: api, or sdk.api, when it has an HTTP gateway)."
)
DENIED = "workerloader._errors.PermissionDenied"


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


def worker(
    loader: Loader, worker_id: str, outbound: object = None, env: dict[str, object] | None = None
) -> Any:
    code = WorkerCode(
        main_module="main.py", modules={"main.py": WORKER}, env=env or {}, global_outbound=outbound
    )
    return loader.get(worker_id, lambda: code).get_entrypoint("Api")


async def test_a_worker_fetches_through_its_global_outbound(
    loader: Loader, server: LoopbackServer
) -> None:
    api = worker(loader, "w", HttpGateway(["127.0.0.1"], allow_private=True))
    assert await api.get(f"{server.base}/hello") == [200, "t", "hello from loopback"]
    status, _, text = await api.post(f"{server.base}/echo", "from the sandbox")
    echoed = json.loads(text)
    assert status == 200
    assert (echoed["method"], echoed["body"]) == ("POST", "from the sandbox")
    assert echoed["headers"]["x-from"] == "worker"
    assert server.paths() == ["/hello", "/echo"]


async def test_a_worker_fetch_outside_the_allow_list_is_permission_denied(
    loader: Loader, server: LoopbackServer
) -> None:
    api = worker(loader, "w", HttpGateway(["127.0.0.1"], allow_private=True, timeout_s=0.5))
    server.route("/escape", 302, location="http://169.254.169.254/latest/meta-data/")
    assert await api.attempt(f"http://localhost:{server.port}/hello") == [
        DENIED,
        True,
        "localhost is not in this worker's outbound allow-list ['127.0.0.1']",
    ]
    assert await api.attempt(f"{server.base}/escape") == [
        DENIED,
        True,
        "169.254.169.254 is not in this worker's outbound allow-list ['127.0.0.1']",
    ]
    assert server.paths() == ["/escape"]


async def test_a_worker_without_global_outbound_has_no_fetch(
    loader: Loader, server: LoopbackServer
) -> None:
    api = worker(loader, "w", None)
    assert await api.attempt(f"{server.base}/hello") == [
        "builtins.PermissionError",
        True,
        NO_NETWORK,
    ]
    with pytest.raises(PermissionError, match=r"^" + re.escape(NO_NETWORK) + r"(\n|$)"):
        await api.get(f"{server.base}/hello")
    assert server.seen == []


async def test_sdk_api_decodes_json_through_the_gateway(
    loader: Loader, server: LoopbackServer
) -> None:
    sdk = loader.sdk("t", api=HttpGateway(["127.0.0.1"], allow_private=True))
    api = worker(loader, "w", None, env={"SDK": sdk})
    assert await api.api_get(f"{server.base}/json") == {"items": [1, 2], "ok": True}
    assert await api.api_get(f"{server.base}/hello") == "hello from loopback"  # not JSON: text
    echoed = await api.api_post(f"{server.base}/echo", {"n": 1})
    assert echoed["method"] == "POST"
    assert json.loads(echoed["body"]) == {"n": 1}
    assert echoed["headers"]["content-type"] == "application/json"
    # sdk.api is the gateway only: workers.fetch stays disabled for this worker.
    assert (await api.attempt(f"{server.base}/hello"))[0] == "builtins.PermissionError"
    assert server.paths() == ["/json", "/hello", "/echo"]


async def test_sdk_api_raises_http_error_for_an_answer_outside_2xx(
    loader: Loader, server: LoopbackServer
) -> None:
    sdk = loader.sdk("t", api=HttpGateway(["127.0.0.1"], allow_private=True))
    api = worker(loader, "w", None, env={"SDK": sdk})
    server.route("/gone", 404, b'{"error": "no such customer"}', content_type="application/json")
    url = f"{server.base}/gone"
    assert await api.api_refused(url) == [
        "POST",
        url,
        404,
        {"error": "no such customer"},
        f'POST {url} answered 404: {{"error": "no such customer"}}',
    ]
    # Uncaught, it reaches the caller as the worker's error, naming the status and the body.
    server.route("/gone", 500, b"broken")
    with pytest.raises(WorkerError, match=exact(f"HTTPError: GET {url} answered 500: broken")):
        await api.api_get(url)


async def test_sdk_api_applies_the_gateways_allow_list(
    loader: Loader, server: LoopbackServer
) -> None:
    sdk = loader.sdk("t", api=HttpGateway(["api.example.com"], allow_private=True))
    api = worker(loader, "w", None, env={"SDK": sdk})
    assert await api.api_attempt(f"{server.base}/json") == [
        DENIED,
        True,
        "127.0.0.1 is not in this worker's outbound allow-list ['api.example.com']",
    ]
    assert server.seen == []
