"""The app in process, without a socket: httpx's ASGI transport calls it directly (its lifespan
run by hand, as a server would), for code that embeds the service in its own ASGI stack."""

from __future__ import annotations

from pathlib import Path

import httpx

from workerloader.server import ServerConfig, create_app


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
