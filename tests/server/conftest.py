"""The service running for real: uvicorn on a loopback port, driven over HTTP with httpx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests._net import free_port
from workerloader.server import ServerConfig, create_app
from workerloader.server._protocol import BoundedHttpProtocol


@asynccontextmanager
async def running(
    config: ServerConfig, protocol: type[BoundedHttpProtocol] = BoundedHttpProtocol
) -> AsyncIterator[httpx.AsyncClient]:
    """The service with ``config`` on a free loopback port, as ``workerloader serve`` runs
    it (its connections on ``protocol``), and a client of it."""
    port = free_port()
    app = create_app(config)
    options = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=protocol)
    server = uvicorn.Server(options)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        await task


def address(client: httpx.AsyncClient) -> tuple[str, int]:
    """The host and port of the service ``client`` talks to, for a raw connection to it."""
    url = client.base_url
    assert url.port is not None
    return url.host, url.port


async def store(client: httpx.AsyncClient, worker_id: str, main: str) -> None:
    """Store worker ``worker_id`` whose one module, ``main.py``, is ``main``."""
    stored = await client.put(
        f"/workers/{worker_id}", json={"main_module": "main.py", "modules": {"main.py": main}}
    )
    assert stored.status_code == 200, stored.text


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    """A client of a fresh service, and the service's data dir."""
    data_dir = tmp_path / "data"
    async with running(ServerConfig(data_dir=data_dir, pool_size=2)) as http:
        yield http, data_dir


@pytest.fixture
def client(served: tuple[httpx.AsyncClient, Path]) -> httpx.AsyncClient:
    return served[0]
