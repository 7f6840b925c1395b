"""Streamed response bodies: a worker's ``Response`` over an async generator reaches the host
(``Response.chunks()``) and an HTTP client (the fetch proxy) chunk by chunk, as it is made."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from workerloader import (
    CpuLimitExceeded,
    Limits,
    Loader,
    OutputLimitExceeded,
    WallTimeExceeded,
    WorkerCode,
)
from workerloader.loader import _http

from .conftest import store

MAIN = """
import asyncio, time
from workers import WorkerEntrypoint, Response

released = asyncio.Event()
made = 0  # chunks the endless stream has made


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        path = request.url.rsplit("/", 1)[1]
        if path == "count":
            async def count():
                for i in range(3):
                    await asyncio.sleep(0.05)  # each chunk is made later than the last
                    yield f"{i},"
            return Response(count(), headers={"content-type": "text/plain"})
        if path == "big":
            async def big():
                for _ in range(12):
                    yield b"x" * (256 * 1024)
            return Response(big())
        if path == "gate":  # one chunk, then waits until the next request opens the gate
            async def gated():
                yield b"first,"
                await gate.wait()
                yield b"second"
            return Response(gated())
        if path == "open":
            gate.set()
            return Response("opened")
        if path == "broken":
            async def broken():
                yield b"partial"
                raise ValueError("the stream broke")
            return Response(broken())
        if path == "endless":
            async def endless():
                global made
                try:
                    while True:
                        made += 1
                        yield b"."
                        await asyncio.sleep(0.01)
                finally:
                    released.set()
            return Response(endless())
        if path == "made":
            return Response(str(made))
        if path == "released":
            await asyncio.wait_for(released.wait(), 5)
            return Response("released")
        if path == "flood":
            async def flood():
                try:
                    while True:
                        yield b"y" * 65536
                finally:
                    released.set()
            return Response(flood())
        if path == "burn":  # each chunk takes 0.1 s of CPU
            async def burn():
                for _ in range(20):
                    end = time.process_time() + 0.1
                    while time.process_time() < end:
                        pass
                    yield b"b"
            return Response(burn())
        if path == "slow":  # each chunk takes 0.3 s
            async def slow():
                for _ in range(20):
                    await asyncio.sleep(0.3)
                    yield b"s"
            return Response(slow())
        if path == "whole":  # one body over the 4 MiB a message carries
            return Response(bytes(range(256)) * 20_000)
        if path == "number":
            return Response(42)
        return Response("plain")


gate = asyncio.Event()
"""


def code(limits: Limits | None = None) -> WorkerCode:
    return WorkerCode(main_module="main.py", modules={"main.py": MAIN}, limits=limits or Limits())


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


async def test_a_streamed_body_arrives_chunk_by_chunk_as_the_worker_makes_it(
    loader: Loader,
) -> None:
    stub = loader.get("s", code)
    response = await stub.fetch("https://s/gate")
    assert response.streaming
    chunks = response.chunks()
    assert await anext(chunks) == b"first,"  # while the worker still waits for the gate
    assert await (await stub.fetch("https://s/open")).text() == "opened"
    assert [chunk async for chunk in chunks] == [b"second"]
    counted = await stub.fetch("https://s/count")
    assert counted.headers["content-type"] == "text/plain"
    assert await counted.text() == "0,1,2,"
    assert not counted.streaming
    big = await (await stub.fetch("https://s/big")).bytes()
    assert big == b"x" * (12 * 256 * 1024)
    whole = await stub.fetch("https://s/whole")  # given whole, streamed all the same
    assert whole.streaming
    assert b"".join([c async for c in whole.chunks()]) == bytes(range(256)) * 20_000
    assert await (await stub.fetch("https://s/plain")).text() == "plain"


async def test_a_drained_worker_finishes_its_open_stream_first(loader: Loader) -> None:
    # Between two chunks no call is in flight; the open body still holds the worker.
    stub = loader.get("s", code)
    response = await stub.fetch("https://s/count")
    chunks = response.chunks()
    assert await anext(chunks) == b"0,"
    await loader.evict("s", drain=True)
    assert [chunk async for chunk in chunks] == [b"1,", b"2,"]
    await asyncio.sleep(0.2)
    assert not loader._workers  # stopped once the stream was done


async def test_a_stub_used_after_its_eviction_does_not_leave_a_worker_behind(
    loader: Loader,
) -> None:
    stub = loader.get("s", code)
    assert await (await stub.fetch("https://s/plain")).text() == "plain"
    await loader.evict("s", drain=True)
    await asyncio.sleep(0.2)
    assert not loader._workers
    # A caller that still holds the stub starts a worker that no id holds: it is stopped
    # with the stub, like an uncached one (it lived until the Loader closed).
    assert await (await stub.fetch("https://s/plain")).text() == "plain"
    (late,) = loader._workers
    assert late.uncached
    await stub.aclose()
    assert not loader._workers


async def test_a_stream_that_fails_midway_raises_on_the_read(loader: Loader) -> None:
    response = await loader.get("s", code).fetch("https://s/broken")
    chunks = response.chunks()
    assert await anext(chunks) == b"partial"
    with pytest.raises(ValueError, match="the stream broke"):  # a builtin arrives as itself
        await anext(chunks)


@pytest.mark.parametrize(
    ("path", "error"), [("burn", CpuLimitExceeded), ("slow", WallTimeExceeded)]
)
async def test_a_stream_is_held_to_the_limits_of_the_fetch_that_answered_it(
    loader: Loader, path: str, error: type[Exception]
) -> None:
    # 20 chunks of 0.1 s CPU (or 0.3 s of waiting) each: within limits one by one, not in all
    stub = loader.get("s", lambda: code(Limits(cpu_ms=500, wall_ms=1500)))
    response = await stub.fetch(f"https://s/{path}")
    got = []

    async def read_all() -> None:
        async for chunk in response.chunks():
            got.append(chunk)

    with pytest.raises(error):
        await read_all()
    assert 2 <= len(got) < 10


async def test_a_streams_cpu_is_the_responses_not_the_next_calls(loader: Loader) -> None:
    stub = loader.get("s", lambda: code(Limits(cpu_ms=5000)))
    response = await stub.fetch("https://s/burn")
    assert await response.text() == "b" * 20
    assert response.cpu_ms >= 1900
    await stub.fetch("https://s/plain")
    assert stub.cpu_ms < 100


async def test_a_body_of_another_type_is_a_type_error_naming_it(loader: Loader) -> None:
    with pytest.raises(TypeError, match="not int"):
        await loader.get("s", code).fetch("https://s/number")


async def test_reading_an_endless_stream_whole_stops_at_the_cap(
    loader: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "STREAM_BYTES_MAX", 1 << 20)
    stub = loader.get("s", code)
    with pytest.raises(OutputLimitExceeded, match="read it with chunks"):
        await (await stub.fetch("https://s/flood")).bytes()
    released = await asyncio.wait_for(stub.fetch("https://s/released"), 10)
    assert await released.text() == "released"  # the worker's generator was closed


async def test_leaving_a_stream_early_closes_the_workers_generator(loader: Loader) -> None:
    stub = loader.get("s", code)
    chunks = (await stub.fetch("https://s/endless")).chunks()
    assert await anext(chunks) == b"."
    await chunks.aclose()  # the host is done: the worker's generator runs its finally
    released = await asyncio.wait_for(stub.fetch("https://s/released"), 10)
    assert await released.text() == "released"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


async def test_the_fetch_proxy_streams_a_workers_body_to_the_client(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    await store(client, "s", MAIN)
    async with client.stream("GET", "/workers/s/fetch/gate") as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"first,"  # sent before the worker made the rest
        assert (await client.get("/workers/s/fetch/open")).text == "opened"
        assert b"".join([chunk async for chunk in chunks]) == b"second"
    big = await client.get("/workers/s/fetch/big")  # bigger than a request body may be
    assert len(big.content) == 12 * 256 * 1024
    whole = await client.get("/workers/s/fetch/whole")  # was a 422 FrameTooLarge
    assert (whole.status_code, whole.content) == (200, bytes(range(256)) * 20_000)
    server_log = _Records()
    logging.getLogger("uvicorn.error").addHandler(server_log)
    try:
        async with client.stream("GET", "/workers/s/fetch/broken") as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):  # the body ends without its end
                await response.aread()
    finally:
        logging.getLogger("uvicorn.error").removeHandler(server_log)
    # The worker's error is the request log's (below), not a traceback in the server's log.
    assert server_log.records == []
    assert (await client.get("/workers/s/fetch/plain")).text == "plain"  # all still serve
    head = await client.head("/workers/s/fetch/endless")  # no body goes out, none is made
    assert head.status_code == 200
    await asyncio.sleep(0.2)
    assert (await client.get("/workers/s/fetch/made")).text == "0"
    logged = [(r["status"], r["cpu_ms"] > 0) for r in (await client.get("/logs")).json()["logs"]]
    assert (200, True) in logged
    # The broken stream's record says what ended it (its status had gone out as 200).
    broken = await client.get("/logs", params={"worker": "s", "limit": 1000})
    assert "ValueError" in [r["error_type"] for r in broken.json()["logs"]]
