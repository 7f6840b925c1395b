"""A body of exactly the service's cap (1 MiB) reaches the worker: the host ↔ worker session's
frames leave room for it and its framing (it once failed with 422 FrameTooLarge)."""

from __future__ import annotations

from pathlib import Path

from tests.server.conftest import running
from workerloader.server import ServerConfig

ECHO = """
from workers import WorkerEntrypoint, Response

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(str(len(await request.bytes())))
"""


async def test_a_fetch_body_of_exactly_1_mib_reaches_the_worker(tmp_path: Path) -> None:
    async with running(ServerConfig(data_dir=tmp_path / "data", pool_size=2)) as client:
        definition = {"main_module": "main.py", "modules": {"main.py": ECHO}}
        assert (await client.put("/workers/echo", json=definition)).status_code == 200
        response = await client.post("/workers/echo/fetch/", content=b"x" * (1 << 20))
        assert (response.status_code, response.text) == (200, str(1 << 20))
