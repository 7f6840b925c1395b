"""The /workers endpoints end to end: store, list, call (fetch proxy and RPC), delete."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.server._keys import new_key_header
from workerloader.server._store import ServiceStore

MAIN = """
from workers import WorkerEntrypoint, Response
import workers


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        body = await request.text()
        return Response(f"{request.method} {request.url} {body} {self.env.GREETING}",
                        headers={"x-from": "worker"})


class Notes(WorkerEntrypoint):
    async def add(self, text):
        await self.env.KV.put(text, "1")
        return (await self.env.KV.list())["keys"][0]["name"]

    async def config(self):
        return workers.modules["config.json"]

    async def fail(self):
        raise ValueError("nope")
"""

DEFINITION = {
    "main_module": "main.py",
    "modules": {"main.py": MAIN, "config.json": {"json": {"lang": "en"}}},
    "env": {"GREETING": "hi"},
    "bindings": {"KV": {"type": "kv"}},
}


async def test_store_list_get_call_and_delete_a_worker(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    put = await client.put("/workers/notes", json=DEFINITION)
    assert put.json() == {"ok": True, "id": "notes", "version": 1}
    assert [w["id"] for w in (await client.get("/workers")).json()["workers"]] == ["notes"]
    assert (await client.get("/workers/notes")).json()["env"] == {"GREETING": "hi"}

    fetched = await client.post("/workers/notes/fetch/a/b?q=1", content=b"payload")
    assert fetched.status_code == 200
    assert fetched.text == "POST https://notes/a/b?q=1 payload hi"
    assert fetched.headers["x-from"] == "worker"

    called = await client.post("/workers/notes/rpc/Notes/add", json={"args": ["first"]})
    assert called.json() == {
        "ok": True,
        "result": "first",
        "logs": [],
        "cpu_ms": called.json()["cpu_ms"],
    }
    assert called.json()["cpu_ms"] > 0
    config = await client.post("/workers/notes/rpc/Notes/config", json=[])
    assert config.json()["result"] == {"lang": "en"}
    failed = await client.post("/workers/notes/rpc/Notes/fail")
    assert failed.status_code == 422
    assert failed.json()["error"]["type"] == "ValueError"
    kinds = [(r["kind"], r["status"]) for r in (await client.get("/logs")).json()["logs"]]
    assert kinds == [("rpc", 422), ("rpc", 200), ("rpc", 200), ("fetch", 200)]
    assert all(r["cpu_ms"] > 0 for r in (await client.get("/logs")).json()["logs"])

    assert (await client.delete("/workers/notes")).json() == {"ok": True}
    assert (await client.get("/workers/notes")).status_code == 404
    assert (await client.post("/workers/notes/rpc/Notes/add", json=["x"])).status_code == 404


async def test_a_new_version_serves_new_code(served: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = served
    await client.put("/workers/w", json=DEFINITION)
    assert (await client.get("/workers/w/fetch/")).text.endswith(" hi")
    changed = {**DEFINITION, "env": {"GREETING": "hello"}}
    assert (await client.put("/workers/w", json=changed)).json()["version"] == 2
    assert (await client.get("/workers/w/fetch/")).text.endswith(" hello")


async def test_a_broken_worker_is_refused_not_stored(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    broken = {**DEFINITION, "modules": {"main.py": "def oops(:\n"}}
    refused = await client.put("/workers/bad", json=broken)
    assert refused.status_code == 422
    assert refused.json()["error"]["type"] == "SyntaxError"
    assert (await client.get("/workers/bad")).status_code == 404
    assert (await client.put("/workers/bad", content=b"{")).status_code == 400
    assert (await client.put("/workers/..", json=DEFINITION)).status_code in (400, 404)


async def test_another_namespaces_worker_is_not_found(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    alice = new_key_header(store, "alice", "a")
    bob = new_key_header(store, "bob", "b")
    assert (await client.put("/workers/w", json=DEFINITION, headers=alice)).status_code == 200
    assert (await client.get("/workers/w", headers=bob)).status_code == 404
    assert (await client.get("/workers/w/fetch/", headers=bob)).status_code == 404
    assert (await client.get("/workers", headers=bob)).json() == {"workers": []}
    assert (await client.get("/workers/w/fetch/", headers=alice)).status_code == 200
    logs = (await client.get("/logs", headers=alice)).json()["logs"]
    assert logs[0]["kind"] == "fetch"
    assert logs[0]["worker"] == "w"


async def test_a_read_only_key_can_neither_store_nor_delete_a_worker(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    writer = new_key_header(store, "alice", "a")
    reader = new_key_header(store, "bob", "a", ("read",))
    assert (await client.put("/workers/w", json=DEFINITION, headers=writer)).status_code == 200
    forbidden = {"ok": False, "error": {"type": "Forbidden", "message": "a read-only key"}}
    put = await client.put("/workers/w", json=DEFINITION, headers=reader)
    assert (put.status_code, put.json()) == (403, forbidden)
    deleted = await client.delete("/workers/w", headers=reader)
    assert (deleted.status_code, deleted.json()) == (403, forbidden)
    # Refused before the lookup, as PUT is: a reader learns nothing from a missing worker.
    missing = await client.delete("/workers/nope", headers=reader)
    assert (missing.status_code, missing.json()) == (403, forbidden)
    assert (await client.get("/workers/w", headers=reader)).json()["version"] == 1
    assert (await client.get("/workers/w/fetch/", headers=reader)).status_code == 200
    assert (await client.delete("/workers/w", headers=writer)).json() == {"ok": True}
    assert (await client.get("/workers/w", headers=reader)).status_code == 404


NOT_JSON = """
from workers import WorkerEntrypoint


class Numbers(WorkerEntrypoint):
    async def huge(self):
        print("computing")
        return {"x": [1.0, float("inf")]}

    async def fine(self):
        return 1.5
"""


async def test_a_result_json_cannot_carry_is_a_422_naming_where(
    client: httpx.AsyncClient,
) -> None:
    definition = {"main_module": "main.py", "modules": {"main.py": NOT_JSON}}
    assert (await client.put("/workers/n", json=definition)).status_code == 200
    called = await client.post("/workers/n/rpc/Numbers/huge", json=[])
    assert called.status_code == 422
    body = called.json()
    assert body == {
        "ok": False,
        "error": {"type": "NotJsonError", "message": body["error"]["message"]},
        "logs": ["computing"],
        "cpu_ms": body["cpu_ms"],
    }
    assert "result['x'][1]" in body["error"]["message"]
    assert "inf" in body["error"]["message"]
    assert body["cpu_ms"] > 0
    # The worker is still there and still answers.
    assert (await client.post("/workers/n/rpc/Numbers/fine", json=[])).json()["result"] == 1.5
    logs = (await client.get("/logs")).json()["logs"]
    assert [(r["kind"], r["status"], r["error_type"]) for r in logs] == [
        ("rpc", 200, None),
        ("rpc", 422, "NotJsonError"),
    ]
    assert logs[1]["logs"] == ["computing"]


async def test_a_worker_deleted_and_stored_again_elsewhere_serves_its_new_code(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    # The CLI writes the database from another process: after its delete, the next store is
    # version 1 again, and the service's warm process of the old version 1 must not answer.
    client, data_dir = served

    def definition(greeting: str) -> dict[str, object]:
        return {**DEFINITION, "env": {"GREETING": greeting}}

    assert (await client.put("/workers/w", json=definition("old"))).status_code == 200
    assert (await client.get("/workers/w/fetch/")).text.endswith(" old")
    cli = ServiceStore(data_dir)
    assert cli.delete_worker("default", "w")
    assert cli.put_worker("default", "w", definition("new")) == 1
    assert (await client.get("/workers/w/fetch/")).text.endswith(" new")


SLOW = """
import asyncio
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        if request.url.endswith("/slow"):
            await asyncio.sleep(1)
        return Response("VERSION")
"""


async def test_a_request_in_flight_finishes_on_the_version_it_started_on(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served

    def version(name: str) -> dict[str, object]:
        return {"main_module": "main.py", "modules": {"main.py": SLOW.replace("VERSION", name)}}

    assert (await client.put("/workers/w", json=version("v1"))).status_code == 200
    assert (await client.get("/workers/w/fetch/")).text == "v1"  # warm
    slow = asyncio.ensure_future(client.get("/workers/w/fetch/slow"))
    await asyncio.sleep(0.3)
    assert (await client.put("/workers/w", json=version("v2"))).status_code == 200
    assert (await client.get("/workers/w/fetch/")).text == "v2"
    answered = await slow  # not a 502: its worker was drained, not killed
    assert (answered.status_code, answered.text) == (200, "v1")
    slow = asyncio.ensure_future(client.get("/workers/w/fetch/slow"))
    await asyncio.sleep(0.3)
    assert (await client.delete("/workers/w")).status_code == 200
    answered = await slow
    assert (answered.status_code, answered.text) == (200, "v2")
    assert (await client.get("/workers/w/fetch/")).status_code == 404


async def test_the_fetch_path_without_its_slash_is_the_workers_root(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    # `curl .../workers/w/fetch` answers, not with an empty redirect.
    client, _ = served
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    answer = await client.get("/workers/w/fetch")
    assert answer.status_code == 200
    assert answer.text == (await client.get("/workers/w/fetch/")).text
