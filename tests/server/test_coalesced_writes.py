"""A response's head goes out with its body in one send (``_protocol._Coalescing``), and a head
with no body ready yet still goes out at once: the transport wrapper against a recording
transport, and the real server streaming a body whose first chunk waits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from workerloader.server._protocol import _Coalescing

from .conftest import address, store

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"


class _Recorder:
    """Stands in for the socket transport under the wrapper: records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", b""))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> Any:
        return f"extra {name}"


def _wrapped() -> tuple[_Coalescing, _Recorder]:
    recorder = _Recorder()
    return _Coalescing(recorder, asyncio.get_running_loop()), recorder  # type: ignore[arg-type]


async def test_a_head_and_its_body_go_out_in_one_write() -> None:
    transport, recorder = _wrapped()
    transport.write(HEAD)
    assert recorder.calls == []
    transport.write(b"4")
    assert recorder.calls == [("write", HEAD + b"4")]
    await asyncio.sleep(0)  # the turn's end finds nothing more held
    assert recorder.calls == [("write", HEAD + b"4")]


async def test_a_head_alone_goes_out_at_the_end_of_the_turn() -> None:
    transport, recorder = _wrapped()
    transport.write(HEAD)
    await asyncio.sleep(0)
    assert recorder.calls == [("write", HEAD)]
    transport.write(b"later")  # nothing held: straight through
    assert recorder.calls == [("write", HEAD), ("write", b"later")]


async def test_other_writes_are_not_held() -> None:
    transport, recorder = _wrapped()
    transport.writelines([b"chunk", b"another"])
    view = memoryview(HEAD)  # a body may come as a memoryview: never taken for a head
    transport.write(view)
    assert recorder.calls == [("write", b"chunk"), ("write", b"another"), ("write", view)]


async def test_closing_or_ending_sends_a_held_head_first_and_aborting_drops_it() -> None:
    transport, recorder = _wrapped()
    transport.write(HEAD)
    transport.close()
    assert recorder.calls == [("write", HEAD), ("close", b"")]
    transport, recorder = _wrapped()
    transport.write(HEAD)
    transport.write_eof()
    assert recorder.calls == [("write", HEAD), ("write_eof", b"")]
    transport, recorder = _wrapped()
    transport.write(HEAD)
    transport.abort()
    await asyncio.sleep(0)
    assert recorder.calls == [("abort", b"")]


async def test_a_head_held_past_a_close_elsewhere_is_dropped() -> None:
    transport, recorder = _wrapped()
    transport.write(HEAD)
    recorder.closing = True  # the connection was lost meanwhile
    await asyncio.sleep(0)
    assert recorder.calls == []


async def test_everything_else_is_the_transports() -> None:
    transport, _ = _wrapped()
    assert transport.get_extra_info("peername") == "extra peername"


WAITING = """
import asyncio
from workers import WorkerEntrypoint, Response

gate = asyncio.Event()


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        if request.url.endswith("/open"):
            gate.set()
            return Response("opened")

        async def after_the_gate():
            await gate.wait()
            yield b"body"

        return Response(after_the_gate())
"""


async def test_a_streamed_responses_head_arrives_before_its_first_chunk(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    await store(client, "w", WAITING)
    reader, writer = await asyncio.open_connection(*address(client))
    try:
        writer.write(b"GET /workers/w/fetch/wait HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding: chunked" in head
        # The body is not made until now: the head went out without it.
        assert (await client.get("/workers/w/fetch/open")).text == "opened"
        assert (
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10) == b"4\r\nbody\r\n0\r\n\r\n"
        )
    finally:
        writer.close()
