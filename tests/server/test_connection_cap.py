"""The number of open connections is capped: one past ``max_connections`` is answered 503 and
closed at once. The real server on loopback, driven over raw sockets; what the server holds is
read from this process's own sockets (the server runs in it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.cli._running import running_cli
from workerloader.server import ServerConfig
from workerloader.server._protocol import LINGER_S, BoundedHttpProtocol

from .conftest import address, running
from .test_connection_bounds import _answer

_HEALTH = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _CapOfThree(BoundedHttpProtocol):
    max_connections = 3
    max_lingering_refusals = 2


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The service holding at most three connections, two refused ones lingering."""
    config = ServerConfig(data_dir=tmp_path / "data", pool_size=1)
    async with running(config, _CapOfThree) as http:
        yield http


def _held_by_server(port: int) -> int:
    """The connections the server on ``port`` holds open: its ends of them, which have a
    descriptor in this process (a client's end has ``port`` as its remote one)."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
    )


async def _until_held(port: int, count: int, within: float = 5.0) -> None:
    """Wait until the server holds ``count`` connections; AssertionError after ``within`` s."""
    deadline = time.monotonic() + within
    while (held := _held_by_server(port)) != count:
        assert time.monotonic() < deadline, f"the server holds {held}, not {count}"
        await asyncio.sleep(0.01)


async def _served(http: httpx.AsyncClient) -> Connection:
    """A connection the server took: its ``GET /health`` answered 200, so it is counted."""
    reader, writer = await asyncio.open_connection(*address(http))
    writer.write(_HEALTH)
    assert (await _answer(reader))[0] == 200
    return reader, writer


async def _refused(http: httpx.AsyncClient, request: bytes = _HEALTH) -> Connection:
    """A connection past the cap, ``request`` sent on it: its 503, as the service's error
    shape, read whole."""
    reader, writer = await asyncio.open_connection(*address(http))
    writer.write(request)
    status, headers, body = await _answer(reader)
    assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "TooManyConnections"
    assert "holds at most 3 (max_connections); retry later" in error["message"]
    return reader, writer


async def _close(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()
        await writer.wait_closed()


async def test_a_connection_past_the_cap_is_answered_503_and_closed(
    capped: httpx.AsyncClient,
) -> None:
    held = [await _served(capped) for _ in range(3)]
    reader, writer = await _refused(capped)
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the server ended it
    await _close([(reader, writer)])
    # An ordinary client reads the answer too: it sent its request after the 503 went out.
    answer = await capped.get("/health")
    assert answer.status_code == 503
    assert answer.json()["error"]["type"] == "TooManyConnections"
    # The connections held go on being served.
    for held_reader, held_writer in held:
        held_writer.write(_HEALTH)
        assert (await _answer(held_reader))[0] == 200
    await _close(held)


async def test_a_place_that_comes_free_is_taken_by_the_next_connection(
    capped: httpx.AsyncClient,
) -> None:
    # While a refused connection lingers: it holds no place.
    port = address(capped)[1]
    held = [await _served(capped) for _ in range(3)]
    lingering = await _refused(capped, b"")
    await _close(held[:1])
    await _until_held(port, 3)  # two served, one lingering
    held[:1] = [await _served(capped)]
    await _close([await _refused(capped)])  # three again: the next is refused
    await _close([*held, lingering])
    await _until_held(port, 0)


async def test_refused_connections_do_not_count_and_every_one_is_uncounted_at_its_close(
    capped: httpx.AsyncClient,
) -> None:
    # Forty rounds of three connections served and three refused (two lingering, one closed
    # at once, or three lingering), ended by either side, read or not (a client closing on
    # an unread answer resets its connection). A connection counted twice or uncounted twice
    # and the cap would be off by forty: a served connection refused, or a fourth served.
    port = address(capped)[1]
    for round_ in range(40):
        held = [await _served(capped) for _ in range(3)]
        refused = [await _refused(capped) for _ in range(2)]
        if round_ % 2:  # the client half-closes: the server closes its end, not the client
            for _, writer in refused:
                writer.write_eof()
            await _until_held(port, 3)
        _, unread = await asyncio.open_connection(*address(capped))
        unread.write(_HEALTH)
        await asyncio.sleep(0.01 if round_ % 3 else 0)  # its 503 read by no one
        unread.close()
        with contextlib.suppress(ConnectionResetError):  # closed at once on a request unread
            await unread.wait_closed()
        await _close([*(held if round_ % 4 else held[::-1]), *refused])
        await _until_held(port, 0)
    held = [await _served(capped) for _ in range(3)]
    lingering = [await _refused(capped, b"") for _ in range(2)]
    await _until_held(port, 5)  # both linger: the lingering ones were uncounted too
    await _close([*held, *lingering])
    await _until_held(port, 0)


async def test_refusals_linger_only_up_to_their_own_bound(capped: httpx.AsyncClient) -> None:
    # Refused connections that neither read nor close: two linger (for LINGER_S), and past
    # them each is closed at once. Lingering without a bound, a client opening connections
    # faster than they linger held as many descriptors as it liked, the cap notwithstanding.
    port = address(capped)[1]
    held = [await _served(capped) for _ in range(3)]
    lingering = [await _refused(capped, b"") for _ in range(2)]
    await _until_held(port, 5)
    past = [await _refused(capped, b"") for _ in range(3)]  # sent nothing: no reset
    for reader, _ in past:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    await _until_held(port, 5, within=LINGER_S / 2)  # not 8 (then 6, then 3): three closed
    await _until_held(port, 3, within=LINGER_S + 5)  # the two lingered, then closed too
    await _close([*held, *lingering, *past])
    await _until_held(port, 0)


def test_serve_holds_max_connections_from_its_flag(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    with (
        running_cli("serve", "--data-dir", data, "--max-connections", "1") as served,
        httpx.Client(base_url=served.url, timeout=10) as held,
    ):
        # The one place comes free once the server has seen running_cli's probe close.
        deadline = time.monotonic() + 10
        while held.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "no place came free"
            time.sleep(0.05)
        refused = httpx.get(f"{served.url}/health", timeout=10)
        assert refused.status_code == 503
        assert "holds at most 1 (max_connections)" in refused.json()["error"]["message"]
        assert held.get("/health").status_code == 200  # on the connection it holds
