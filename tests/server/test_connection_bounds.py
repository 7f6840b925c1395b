"""A request head is bounded on the connection, in size (431) and time (408), before the app
runs: the real server on loopback, driven over raw sockets where httpx would not misbehave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from workerloader.server import ServerConfig
from workerloader.server._protocol import LINGER_S, MAX_HEAD_BYTES, BoundedHttpProtocol

from .conftest import address, running


class _QuickHead(BoundedHttpProtocol):
    head_timeout_s = 0.5


@pytest.fixture
async def quick(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The service with a head timeout of half a second."""
    async with running(ServerConfig(data_dir=tmp_path / "data", pool_size=2), _QuickHead) as http:
        yield http


def _execute_head(length: int) -> bytes:
    """The head of a ``POST /execute`` whose JSON body is ``length`` bytes."""
    return (
        b"POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % length
    )


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off ``reader``: status, headers, body (by its content-length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode().split("\r\n")[:-2]
    headers = dict(line.lower().split(": ", 1) for line in lines)
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


async def _flood(writer: asyncio.StreamWriter, first: bytes, chunk: bytes, seconds: float) -> int:
    """Send ``first``, then ``chunk`` over and over for ``seconds`` or until the server
    closes; the bytes sent."""
    sent = 0
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        writer.write(first)
        while asyncio.get_running_loop().time() < deadline:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:
        return sent
    raise AssertionError(f"the server still took bytes after {seconds} s ({sent} in all)")


async def _refused_while_sending(client: httpx.AsyncClient, first: bytes, chunk: bytes) -> bytes:
    """The answer to a head that never ends (``first``, then ``chunk`` forever): read while
    still sending, the connection closed soon after, what was sent held nowhere."""
    reader, writer = await asyncio.open_connection(*address(client))
    writer.write(first + chunk * (2 * MAX_HEAD_BYTES // len(chunk) + 1))
    status, headers, body = await _answer(reader)
    assert (status, headers["connection"]) == (431, "close")
    before = psutil.Process().memory_info().rss
    sent = await _flood(writer, b"", chunk, seconds=LINGER_S + 8)
    grown = psutil.Process().memory_info().rss - before
    print(f"sent {sent >> 20} MB after the refusal; the server grew {grown >> 20} MB")
    assert sent >= 16 << 20  # loopback carries that in far less than LINGER_S
    assert grown < sent // 2  # held, it would all show
    writer.close()
    return body


async def test_an_endless_header_stream_is_431_and_closed(client: httpx.AsyncClient) -> None:
    # Before: the server kept every byte (200 MB sent, 200 MB more resident) and never answered.
    header = b"x-a: " + b"a" * 8000 + b"\r\n"
    body = await _refused_while_sending(client, b"GET /health HTTP/1.1\r\nhost: x\r\n", header)
    error = json.loads(body)["error"]
    assert error["type"] == "RequestHeaderFieldsTooLarge"
    assert str(MAX_HEAD_BYTES) in error["message"]
    # The service goes on serving.
    assert (await client.get("/health")).status_code == 200


async def test_one_header_line_without_end_is_431(client: httpx.AsyncClient) -> None:
    body = await _refused_while_sending(client, b"GET /health HTTP/1.1\r\nx-a: ", b"b" * 65536)
    assert json.loads(body)["error"]["type"] == "RequestHeaderFieldsTooLarge"


async def test_a_body_sent_with_its_head_is_not_counted(client: httpx.AsyncClient) -> None:
    # Head and a 900 KB body in one write: the body is the request's, however it arrives.
    code = "return len(" + repr("z" * 900_000) + ")"
    body = json.dumps({"code": code}).encode()
    head = _execute_head(len(body))
    reader, writer = await asyncio.open_connection(*address(client))
    writer.write(head + body)
    status, _, answer = await _answer(reader)
    assert (status, json.loads(answer)["result"]) == (200, 900_000)
    # The same connection takes a next request: the count began again.
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await _answer(reader))[0] == 200
    writer.close()


async def test_a_head_left_unfinished_is_408_and_closed(quick: httpx.AsyncClient) -> None:
    reader, writer = await asyncio.open_connection(*address(quick))
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # no blank line: the head goes on
    status, headers, body = await _answer(reader)
    assert (status, headers["connection"]) == (408, "close")
    assert json.loads(body)["error"]["type"] == "RequestTimeout"
    assert await reader.read() == b""
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed_quietly(
    quick: httpx.AsyncClient,
) -> None:
    reader, writer = await asyncio.open_connection(*address(quick))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_slow_answer_or_body_is_not_a_slow_head(quick: httpx.AsyncClient) -> None:
    # The head's time bounds the head: a call running past it is answered, on a connection
    # that goes on to serve a pipelined request sent while the first one ran.
    reader, writer = await asyncio.open_connection(*address(quick))
    body = json.dumps({"code": "import time\ntime.sleep(1.2)\nreturn 1"}).encode()
    writer.write(_execute_head(len(body)))
    await asyncio.sleep(0.3)  # the body comes late too (a pause under the 0.5 s)
    writer.write(body + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    status, _, answer = await _answer(reader)
    assert (status, json.loads(answer)["result"]) == (200, 1)
    assert (await _answer(reader))[0] == 200
    writer.close()


async def test_keep_alive_requests_each_get_the_whole_time(quick: httpx.AsyncClient) -> None:
    # Three requests on one connection, 0.3 s apart (0.9 s in all, past the 0.5 s): each
    # head's time runs from the previous answer, not from the connection's start.
    reader, writer = await asyncio.open_connection(*address(quick))
    for _ in range(3):
        await asyncio.sleep(0.3)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await _answer(reader))[0] == 200
    writer.close()


async def test_a_runaway_head_behind_a_running_request_is_refused_after_its_answer(
    client: httpx.AsyncClient,
) -> None:
    # Answers go out in order: the first request's, then the 431 for the second one's head.
    reader, writer = await asyncio.open_connection(*address(client))
    body = json.dumps({"code": "import asyncio\nawait asyncio.sleep(0.5)\nreturn 1"}).encode()
    head = _execute_head(len(body))
    runaway = b"GET /health HTTP/1.1\r\nx-a: " + b"c" * (2 * MAX_HEAD_BYTES)
    writer.write(head + body + runaway)
    status, _, answer = await _answer(reader)
    assert (status, json.loads(answer)["result"]) == (200, 1)
    assert (await _answer(reader))[0] == 431
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_refusal_waits_for_every_request_queued_before_it(
    client: httpx.AsyncClient,
) -> None:
    # A slow request, a whole one queued behind it, then a runaway head: the second request
    # got the 431 as its answer (and its own answer failed) when the refusal went out as soon
    # as the first was answered.
    reader, writer = await asyncio.open_connection(*address(client))
    body = json.dumps({"code": "import asyncio\nawait asyncio.sleep(0.3)\nreturn 1"}).encode()
    slow = _execute_head(len(body)) + body
    queued = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    runaway = b"GET /health HTTP/1.1\r\nx-a: " + b"c" * (2 * MAX_HEAD_BYTES)
    writer.write(slow + queued + runaway)
    assert (await _answer(reader))[0] == 200
    status, _, health = await _answer(reader)
    assert (status, json.loads(health)["status"]) == (200, "ok")
    assert (await _answer(reader))[0] == 431
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_body_that_stops_coming_ends_its_connection(quick: httpx.AsyncClient) -> None:
    # A declared body trickled, then stalled: the connection (and the handler waiting on the
    # body) was held as long as the client liked.
    reader, writer = await asyncio.open_connection(*address(quick))
    writer.write(_execute_head(1000) + b'{"code": ')
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no answer
    writer.close()
    assert (await quick.get("/health")).status_code == 200
    # A body whose pauses are each shorter goes through, however long it takes in all.
    body = json.dumps({"code": "return 7"}).encode()
    reader, writer = await asyncio.open_connection(*address(quick))
    writer.write(_execute_head(len(body)))
    for i in range(0, len(body), 4):
        await asyncio.sleep(0.1)  # 0.1 s pauses, ~0.5 s in all: past the 0.5 s for a pause
        writer.write(body[i : i + 4])
    status, _, answer = await _answer(reader)
    assert (status, json.loads(answer)["result"]) == (200, 7)
    writer.close()
