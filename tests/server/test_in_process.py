"""The app in process, without a socket: httpx's ASGI transport calls it directly (its lifespan
run by hand, as a server would), for code that embeds the service in its own ASGI stack."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from workerloader.server import ServerConfig, create_app
from workerloader.server._store import ServiceStore


async def test_the_app_answers_in_process_through_its_lifespan(tmp_path: Path) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path / "data", pool_size=1))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            health = (await client.get("/health")).json()
            assert (health["status"], health["sandbox"], health["auth"]) == (
                "ok",
                "confined",
                "dev",
            )
            answer = await client.post("/execute", json={"code": "return 2 + 2"})
            assert answer.status_code == 200
            assert answer.json()["result"] == 4
            assert (await client.post("/execute", content=b"{")).status_code == 400
            logs = (await client.get("/logs")).json()["logs"]
            assert [(r["kind"], r["status"]) for r in logs] == [("execute", 400), ("execute", 200)]


async def test_a_memory_error_under_a_request_is_a_503_not_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite at its process-wide heap limit (a worker's query can hold most of it for a few
    # seconds) makes the service's own key lookups raise MemoryError: a passing state.
    app = create_app(ServerConfig(data_dir=tmp_path / "data", pool_size=1))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

            def short_of_memory(self: ServiceStore) -> bool:
                raise MemoryError

            with monkeypatch.context() as patched:
                patched.setattr(ServiceStore, "has_keys", short_of_memory)
                answer = await client.post("/execute", json={"code": "return 1"})
            assert answer.status_code == 503
            assert answer.json()["error"]["type"] == "ServiceUnavailable"
            assert (await client.post("/execute", json={"code": "return 1"})).status_code == 200
