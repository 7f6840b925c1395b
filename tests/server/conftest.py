"""The service running for real: uvicorn on a loopback port, driven over HTTP with httpx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests._net import free_port
from workerloader.server import ServerConfig, create_app


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    """A client of a fresh service, and the service's data dir."""
    data_dir = tmp_path / "data"
    port = free_port()
    app = create_app(ServerConfig(data_dir=data_dir, pool_size=2))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http, data_dir
    server.should_exit = True
    await task


@pytest.fixture
def client(served: tuple[httpx.AsyncClient, Path]) -> httpx.AsyncClient:
    return served[0]
