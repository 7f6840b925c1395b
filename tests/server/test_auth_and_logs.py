"""API keys and request logs: dev mode without keys, 401 with them, namespaces by key."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.server._keys import bearer, new_key_header
from workerloader.cli import main as cli
from workerloader.server import _store
from workerloader.server._store import Caller, ServiceStore


async def test_without_keys_the_service_is_in_dev_mode(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    assert (await client.get("/health")).json()["auth"] == "dev"
    body = (await client.post("/execute", json={"code": "return context.namespace"})).json()
    assert body["result"] == "default"


async def test_with_keys_requests_need_one_and_run_in_its_namespace(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    alice = store.create_key("alice", "team-a")
    bob = store.create_key("bob", "team-b", ("read",))
    assert (await client.get("/health")).json()["auth"] == "keys"
    code = {"code": "return [context.user_id, context.namespace, list(context.permissions)]"}
    assert (await client.post("/execute", json=code)).status_code == 401
    wrong = {"authorization": "Bearer wl_not-a-key"}
    assert (await client.post("/execute", json=code, headers=wrong)).status_code == 401
    as_alice = bearer(alice)
    as_bob = bearer(bob)
    answer = await client.post("/execute", json=code, headers=as_alice)
    assert answer.json()["result"] == ["alice", "team-a", ["read", "write"]]
    write = {"code": "await kv.put('k', 'v')\nreturn await kv.get('k')"}
    assert (await client.post("/execute", json=write, headers=as_alice)).json()["result"] == "v"
    denied = (await client.post("/execute", json=write, headers=as_bob)).json()
    assert denied["error"]["type"] == "PermissionDenied"
    read = {"code": "return await kv.get('k')"}
    assert (await client.post("/execute", json=read, headers=as_bob)).json()["result"] is None

    store.revoke(alice.id)
    assert (await client.post("/execute", json=code, headers=as_alice)).status_code == 401


async def test_revoking_the_last_key_does_not_open_the_service(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    # An operator revoking a leaked key: neither it nor anonymous callers get in afterwards.
    client, data_dir = served
    store = ServiceStore(data_dir)
    only = store.create_key("ops", "default")
    await client.post("/execute", json={"code": "await kv.put('s', 'x')"}, headers=bearer(only))
    store.revoke(only.id)
    assert (await client.get("/health")).json()["auth"] == "keys"
    read = {"code": "return await kv.get('s')"}
    assert (await client.post("/execute", json=read)).status_code == 401
    assert (await client.post("/execute", json=read, headers=bearer(only))).status_code == 401


async def test_every_execute_is_logged_and_logs_are_per_namespace(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    await client.post("/execute", json={"code": "print('hello')\nreturn 1"})
    await client.post("/execute", json={"code": "raise ValueError('x')"})
    logs = (await client.get("/logs")).json()["logs"]
    assert [(r["status"], r["error_type"], r["logs"]) for r in logs] == [
        (422, "ValueError", []),
        (200, None, ["hello"]),
    ]
    assert all(0 < r["cpu_ms"] < r["duration_ms"] for r in logs)
    assert (await client.get("/logs", params={"status": 200})).json()["logs"][0]["logs"] == [
        "hello"
    ]
    store = ServiceStore(data_dir)
    other = store.create_key("eve", "elsewhere")
    seen = await client.get("/logs", headers=bearer(other))
    assert seen.json()["logs"] == []


def test_the_keys_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--user", "ada", "--data-dir", str(tmp_path)])
    assert created.exit_code == 0, created.output
    key_id = created.output.split()[1]
    secret = created.output.split()[3]
    assert secret.startswith("wl_")
    listed = runner.invoke(cli, ["keys", "list", "--data-dir", str(tmp_path)])
    assert key_id in listed.output
    assert secret not in listed.output
    assert ServiceStore(tmp_path).caller_for(secret) is not None
    revoked = runner.invoke(cli, ["keys", "revoke", key_id, "--data-dir", str(tmp_path)])
    assert revoked.exit_code == 0
    assert ServiceStore(tmp_path).caller_for(secret) is None
    again = runner.invoke(cli, ["keys", "revoke", key_id, "--data-dir", str(tmp_path)])
    assert again.exit_code != 0


async def test_the_log_stream_sends_new_records_as_they_are_written(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    async with client.stream("GET", "/logs/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith(":")  # the opening comment
        await client.post("/execute", json={"code": "print('live')\nreturn 1"})
        async with asyncio.timeout(10):
            async for line in lines:
                if line.startswith("data: "):
                    record = json.loads(line[len("data: ") :])
                    break
    assert record["kind"] == "execute"
    assert record["status"] == 200
    assert record["logs"] == ["live"]


async def next_event(lines: Any) -> str:
    """The next event line (``data:`` or ``event:``) of a log stream."""
    async with asyncio.timeout(10):
        async for line in lines:
            if line.startswith(("data: ", "event: ")):
                return str(line)
    raise AssertionError("the stream ended")


async def test_the_log_stream_filters_as_logs_does_and_ends_with_its_key(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    watcher, writer = store.create_key("w", "team"), store.create_key("x", "team")
    assert (
        await client.get("/logs/stream", params={"namespace": "other"}, headers=bearer(watcher))
    ).status_code == 403
    params = {"status": 422}
    async with client.stream(
        "GET", "/logs/stream", params=params, headers=bearer(watcher)
    ) as stream:
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith(":")
        await client.post("/execute", json={"code": "return 1"}, headers=bearer(writer))
        await client.post("/execute", json={"code": "1 / 0"}, headers=bearer(writer))
        record = json.loads((await next_event(lines))[len("data: ") :])
        assert (record["status"], record["error_type"]) == (422, "ZeroDivisionError")
        store.revoke(watcher.id)
        await client.post(
            "/execute", json={"code": "print('after')\n1 / 0"}, headers=bearer(writer)
        )
        assert await next_event(lines) == "event: error"


async def test_require_auth_refuses_anonymous_callers_before_any_key_exists(
    tmp_path: Path,
) -> None:
    from tests.server.conftest import running
    from workerloader.server import ServerConfig

    config = ServerConfig(data_dir=tmp_path / "data", pool_size=1, require_auth=True)
    async with running(config) as client:
        assert (await client.get("/health")).json()["auth"] == "keys"
        refused = await client.post("/execute", json={"code": "return 1"})
        assert refused.status_code == 401


def test_a_request_log_from_before_cpu_ms_is_kept_and_new_records_get_it(
    tmp_path: Path,
) -> None:
    # The table as data dirs made before the column have it.
    conn = sqlite3.connect(tmp_path / "service.sqlite3")
    conn.execute(
        "CREATE TABLE request_logs (id TEXT PRIMARY KEY, time REAL NOT NULL, user_id TEXT, "
        "namespace TEXT NOT NULL, worker TEXT, kind TEXT NOT NULL, status INTEGER NOT NULL, "
        "duration_ms REAL NOT NULL, error_type TEXT, logs TEXT NOT NULL)"
    )
    conn.execute(
        "INSERT INTO request_logs VALUES ('old', ?, NULL, 'default', NULL, 'execute', 200, "
        "2.5, NULL, '[\"hi\"]')",
        (time.time() - 1,),
    )
    conn.commit()
    conn.close()
    store = ServiceStore(tmp_path)
    store.log(Caller(None, "default", False, ()), "execute", 200, 3.0, cpu_ms=1.25)
    records = store.logs("default")
    assert [(r["id"] == "old", r["cpu_ms"], r["logs"]) for r in records] == [
        (False, 1.25, []),
        (True, None, ["hi"]),
    ]


def test_records_past_the_retention_are_pruned_without_waiting_for_traffic(
    tmp_path: Path,
) -> None:
    store = ServiceStore(tmp_path, retention_s=60)
    anonymous = Caller(None, "default", False, ())
    store.log(anonymous, "execute", 200, 1.0)
    store.flush()
    conn = sqlite3.connect(tmp_path / "service.sqlite3")
    conn.execute("UPDATE request_logs SET time = time - 3600")  # an hour old now
    conn.commit()
    conn.close()
    reopened = ServiceStore(tmp_path, retention_s=60)
    reopened.flush()  # the service's periodic flush, with nothing new to write
    conn = sqlite3.connect(tmp_path / "service.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM request_logs").fetchone() == (0,)
    conn.close()


def test_the_request_log_stops_growing_at_its_size_cap(tmp_path: Path) -> None:
    # Any caller makes records, with up to 64 KiB of output each, as fast as it is answered.
    store = ServiceStore(tmp_path, max_bytes=256 << 10)
    anonymous = Caller(None, "default", False, ())
    for i in range(3000):  # ~3 MB of records, flushed 40 at a time (a slower caller)
        store.log(anonymous, "execute", 200, float(i), logs=["x" * 1000])
        if i % 40 == 39:
            store.flush(when_due=True)  # as the service's timer does
    store.flush()
    assert store._size() < 512 << 10
    kept = store.logs("default", limit=1000)
    assert kept[0]["duration_ms"] == 2999.0  # the newest stay, the oldest went
    conn = sqlite3.connect(tmp_path / "service.sqlite3")
    (oldest,) = conn.execute("SELECT min(duration_ms) FROM request_logs").fetchone()
    conn.close()
    assert oldest > 2000


def test_records_the_database_refuses_are_held_not_raised_and_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # On a full disk the batch write failed inside a request: /execute answered 500 and the
    # batch was lost. Now a refused write leaves the records pending (up to a cap).
    monkeypatch.setattr(_store, "_PENDING_LOGS_MAX", 100)
    store = ServiceStore(tmp_path)
    anonymous = Caller(None, "default", False, ())
    store._conn.execute("PRAGMA query_only = ON")  # SQLite now refuses every write
    for i in range(150):  # past the cap
        store.log(anonymous, "execute", 200, float(i))
    store.flush()
    assert "request log records not written" in caplog.text
    assert store.logs("default") == []  # readable still, nothing written
    # Requests go on meanwhile; the held records are not tried again with each one.
    began: list[str] = []
    store._conn.set_trace_callback(lambda sql: began.append(sql) if sql == "BEGIN" else None)
    for i in range(500):
        store.log(anonymous, "execute", 200, 1000.0 + i)
        store.flush(when_due=True)
    assert len(began) <= 1, len(began)
    store._conn.set_trace_callback(None)
    store._conn.execute("PRAGMA query_only = OFF")  # space again
    store.flush()
    kept = store.logs("default", limit=1000)
    assert len(kept) == 100
    assert sorted(r["duration_ms"] for r in kept) == [1400.0 + i for i in range(100)]


async def test_a_warm_stored_worker_never_serves_one_caller_with_anothers_grants(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    writer = new_key_header(store, "ada", "team-a")
    reader = new_key_header(store, "rob", "team-a", ("read",))
    main = (
        "from workers import WorkerEntrypoint, sdk\n"
        "class Info(WorkerEntrypoint):\n"
        "    async def put(self, value):\n"
        "        await self.env.KV.put('k', value)\n"
        "        return value\n"
        "    async def who(self):\n"
        "        return [sdk.context.user_id, sdk.context.permissions]\n"
    )
    definition = {
        "main_module": "main.py",
        "modules": {"main.py": main},
        "bindings": {"KV": {"type": "kv"}, "SDK": {"type": "sdk"}},
    }
    assert (await client.put("/workers/w", json=definition, headers=writer)).status_code == 200
    for first, second in ((writer, reader), (reader, writer)):  # whoever warms it up first
        await client.post("/workers/w/rpc/Info/who", json=[], headers=first)
        who = await client.post("/workers/w/rpc/Info/who", json=[], headers=second)
        expected = ["ada", ["read", "write"]] if second is writer else ["rob", ["read"]]
        assert who.json()["result"] == expected
    put = await client.post("/workers/w/rpc/Info/put", json=["by-reader"], headers=reader)
    assert put.json()["error"]["type"] == "PermissionDenied"
    put = await client.post("/workers/w/rpc/Info/put", json=["by-writer"], headers=writer)
    assert put.json()["result"] == "by-writer"


async def test_logs_filter_by_time_and_refuse_what_cannot_be_answered(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, _ = served
    await client.post("/execute", json={"code": "return 1"})
    middle = time.time()
    await asyncio.sleep(0.01)
    await client.post("/execute", json={"code": "return 2"})
    both = (await client.get("/logs")).json()["logs"]
    assert len(both) == 2
    before = (await client.get("/logs", params={"until": middle})).json()["logs"]
    after = (await client.get("/logs", params={"since": middle})).json()["logs"]
    assert [r["id"] for r in after + before] == [r["id"] for r in both]
    own = await client.get("/logs", params={"namespace": "default", "limit": 1})
    assert [r["id"] for r in own.json()["logs"]] == [both[0]["id"]]
    other = await client.get("/logs", params={"namespace": "team-b"})
    assert other.status_code == 403
    for params in ({"status": 2**63}, {"limit": 0}, {"limit": -1}, {"since": "nan"}):
        refused = await client.get("/logs", params=params)
        assert refused.status_code == 400, params
        assert refused.json()["error"]["message"]


@pytest.mark.parametrize("namespace", ["../../etc", "a b", ""])
def test_a_key_for_a_namespace_the_bindings_cannot_scope_to_is_refused(
    tmp_path: Path, namespace: str
) -> None:
    with pytest.raises(ValueError, match="invalid namespace"):
        ServiceStore(tmp_path).create_key("x", namespace)
    result = CliRunner().invoke(
        cli,
        ["keys", "create", "--user", "x", "--namespace", namespace, "--data-dir", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "invalid namespace" in result.output
    assert ServiceStore(tmp_path).list_keys() == []


async def test_a_key_stored_with_an_invalid_namespace_is_refused_not_a_500(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    key = store.create_key("old", "fine")
    with sqlite3.connect(data_dir / "service.sqlite3") as db:  # as keys made before the check
        db.execute("UPDATE api_keys SET namespace = '../etc' WHERE id = ?", (key.id,))
    answer = await client.post(
        "/execute",
        json={"code": "return 1"},
        headers=bearer(key),
    )
    assert answer.status_code == 403
    assert "revoke the key" in answer.json()["error"]["message"]


async def test_deleting_or_updating_a_worker_stops_every_callers_process(
    served: tuple[httpx.AsyncClient, Path],
) -> None:
    client, data_dir = served
    store = ServiceStore(data_dir)
    callers = [new_key_header(store, user, "team-a") for user in ("ada", "bob")]
    main = (
        "import os\n"
        "from workers import WorkerEntrypoint\n"
        "class Info(WorkerEntrypoint):\n"
        "    async def pid(self):\n"
        "        return os.getpid()\n"
    )
    definition = {"main_module": "main.py", "modules": {"main.py": main}}

    async def live() -> int:
        return int((await client.get("/health")).json()["workers"])

    for change in ("put", "delete"):
        assert (await client.put("/workers/w", json=definition, headers=callers[0])).is_success
        for caller in callers:  # each caller's own warm process
            await client.post("/workers/w/rpc/Info/pid", json=[], headers=caller)
        assert await live() == 2
        if change == "put":
            again = await client.put("/workers/w", json=definition, headers=callers[1])
            assert again.json()["version"] == 2
        else:
            assert (await client.delete("/workers/w", headers=callers[1])).is_success
        assert await live() == 0
    assert (
        await client.post("/workers/w/rpc/Info/pid", json=[], headers=callers[0])
    ).status_code == 404


async def test_over_the_concurrency_limit_execute_is_429_and_logged(tmp_path: Path) -> None:
    from tests.server.conftest import running
    from workerloader.server import ServerConfig

    config = ServerConfig(data_dir=tmp_path / "data", pool_size=2, max_concurrent_executions=1)
    async with running(config) as client:
        slow = asyncio.ensure_future(
            client.post("/execute", json={"code": "import asyncio\nawait asyncio.sleep(1)"})
        )
        await asyncio.sleep(0.4)
        refused = await client.post("/execute", json={"code": "return 1"})
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "TooManyRequests"
        assert (await slow).status_code == 200
        assert (await client.post("/execute", json={"code": "return 1"})).status_code == 200
        bad = await client.post("/execute", json={"cod": "return 1"})
        assert bad.status_code == 400
        missing = await client.get("/workers/nope/fetch/")
        assert missing.status_code == 404
        logged = (await client.get("/logs")).json()["logs"]
        kinds = sorted((r["kind"], r["status"], r["error_type"]) for r in logged)
        assert kinds == [
            ("execute", 200, None),
            ("execute", 200, None),
            ("execute", 400, "BadRequest"),
            ("execute", 429, "TooManyRequests"),
            ("fetch", 404, "NotFound"),
        ]


async def test_records_are_written_in_batches_off_the_way_to_an_answer(tmp_path: Path) -> None:
    # A batch used to be written inside log(), so the request that filled it waited for the
    # write before its answer went out. Now log() only holds the record; a full batch is
    # written on the event loop's next turn, and so is the next one.
    store = ServiceStore(tmp_path)
    anonymous = Caller(None, "default", False, ())
    began: list[str] = []
    store._conn.set_trace_callback(lambda sql: began.append(sql) if sql == "BEGIN" else None)
    for batch in (1, 2):
        for _ in range(_store._FLUSH_AT):
            store.log(anonymous, "fetch", 200, 1.0)
        assert len(began) == batch - 1
        await asyncio.sleep(0)
        assert len(began) == batch
    store._conn.set_trace_callback(None)
    conn = sqlite3.connect(tmp_path / "service.sqlite3")  # another process sees them
    assert conn.execute("SELECT COUNT(*) FROM request_logs").fetchone() == (2 * _store._FLUSH_AT,)
    conn.close()


def test_outside_an_event_loop_a_full_batch_is_written_at_once(tmp_path: Path) -> None:
    # Also after a loop that ended before its scheduled write ran.
    store = ServiceStore(tmp_path)
    anonymous = Caller(None, "default", False, ())

    async def fill() -> None:
        for _ in range(_store._FLUSH_AT):
            store.log(anonymous, "fetch", 200, 1.0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(fill())  # its write is scheduled, never run
    loop.close()
    for _ in range(_store._FLUSH_AT):
        store.log(anonymous, "fetch", 200, 2.0)
    conn = sqlite3.connect(tmp_path / "service.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM request_logs").fetchone() == (2 * _store._FLUSH_AT,)
    conn.close()


def test_a_batch_of_any_size_is_written_whole(tmp_path: Path) -> None:
    store = ServiceStore(tmp_path)
    for count in (1, 63, 64, 65, 200, 999):
        for i in range(count):
            store._pending_logs.append(  # held as log() holds them, past a batch's size
                (f"{count:08x}{i:024x}", 1.0, None, "n", None, "fetch", 200, 1.0, None, None, "[]")
            )
        store.flush()
        assert len(store.logs("n", limit=1000)) == min(count, 1000), count
        store._conn.execute("DELETE FROM request_logs")


def test_request_record_ids_are_unique_and_grow_with_time(tmp_path: Path) -> None:
    store = ServiceStore(tmp_path)
    anonymous = Caller(None, "default", False, ())
    for _ in range(1000):
        store.log(anonymous, "fetch", 200, 1.0)
    ids = [r["id"] for r in reversed(store.logs("default", limit=1000))]  # oldest first
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert [i[:16] for i in ids] == sorted(i[:16] for i in ids)  # their index is appended to
