"""``from workers import sdk`` in the real sandbox: db, kv and sql scoped to the caller's namespace
and permissions, the caller's context, errors as the worker sees them, pipelined SQL calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.bindings._helpers import DESCRIBE
from workerloader import BindingError, Loader, PermissionDenied, WorkerCode, WorkerStub
from workerloader.bindings import Documents, KvNamespace, SqlDatabase

MAIN = (
    """
from workers import WorkerEntrypoint, sdk

"""
    + DESCRIBE
    + """

class Api(WorkerEntrypoint):
    async def context(self):
        c = sdk.context
        return [c.user_id, c.namespace, c.authenticated, list(c.permissions)]

    async def kv_put(self, key, value):
        await sdk.kv.put(key, value)

    async def kv_get(self, key):
        return await sdk.kv.get(key, "json")

    async def kv_keys(self):
        return [k["name"] for k in (await sdk.kv.list())["keys"]]

    async def users(self):
        await sdk.db.create("users", {"name": "ada", "bio": "analytical engines"})
        await sdk.db.create("users", {"name": "grace", "bio": "compilers"})
        found = await sdk.db.search("users", "engines")
        return [[u["name"] for u in await sdk.db.list("users", order_by="-name")],
                [u["name"] for u in found]]

    async def db_names(self, collection):
        return [d["name"] for d in await sdk.db.list(collection)]

    async def sql_notes(self, *notes):
        await sdk.sql.exec("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
        insert = sdk.sql.prepare("INSERT INTO notes (body) VALUES (?)")
        await sdk.sql.batch([await insert.bind(note) for note in notes])
        return (await sdk.sql.prepare("SELECT body FROM notes ORDER BY id").all())["results"]

    async def sql_batch_d1_style(self, *notes):
        # D1's idiom: the bound statements go to batch() as they are, not awaited one by one.
        await sdk.sql.exec("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
        insert = sdk.sql.prepare("INSERT INTO notes (body) VALUES (?)")
        results = await sdk.sql.batch([insert.bind(note) for note in notes])
        return [r["meta"]["changes"] for r in results]

    async def sql_rows(self, query):
        return await sdk.sql.prepare(query).raw()

    async def pipelined(self):
        return [await sdk.sql.prepare("SELECT ?").bind(1).first(),
                await sdk.sql.prepare("SELECT ? + 1 AS v").bind(41).first("v")]

    async def attempt(self, op):
        ops = {
            "kv.get": lambda: sdk.kv.get("k"),
            "kv.put": lambda: sdk.kv.put("k", "v"),
            "kv.delete": lambda: sdk.kv.delete("k"),
            "db.list": lambda: sdk.db.list("users"),
            "db.create": lambda: sdk.db.create("users", {"name": "x"}),
            "db.update": lambda: sdk.db.update("users", "nope", {"name": "x"}),
            "sql.select": lambda: sdk.sql.prepare("SELECT 1 AS one").first("one"),
            "sql.create": lambda: sdk.sql.exec("CREATE TABLE t (a)"),
            "sql.insert": lambda: sdk.sql.prepare("INSERT INTO t VALUES (?)").bind("x").run(),
            "sql.bad": lambda: sdk.sql.prepare("SELECT * FROM nope").all(),
            "sql.attach": lambda: sdk.sql.exec("ATTACH '/tmp/x.db' AS x"),
        }
        return await describe(ops[op]())

    async def touch_db(self):
        return await sdk.db.list("users")

    async def raise_denied(self):
        await sdk.kv.put("k", "v")
"""
)

DENIED_KV = "this binding may not write this KV namespace"
DENIED_DOCS = "this binding may not write these documents"
DENIED_SQL = "this binding may not write this database"
DENIED = "workerloader._errors.PermissionDenied"
BINDING_ERROR = "workerloader._errors.BindingError"


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


def worker(loader: Loader, worker_id: str, sdk: Mapping[str, object] | None) -> Any:
    env: dict[str, object] = {} if sdk is None else {"SDK": sdk}
    stub: WorkerStub = loader.get(
        worker_id, lambda: WorkerCode(main_module="main.py", modules={"main.py": MAIN}, env=env)
    )
    return stub.get_entrypoint("Api")


async def test_the_worker_sees_the_callers_context(loader: Loader) -> None:
    api = worker(loader, "w", loader.sdk("t1", user_id="u1", authenticated=True))
    assert await api.context() == ["u1", "t1", True, ["read", "write"]]
    anonymous = worker(loader, "anon", loader.sdk("t2", permissions=("read",)))
    assert await anonymous.context() == [None, "t2", False, ["read"]]


async def test_the_worker_uses_kv_db_and_sql_of_its_namespace(loader: Loader) -> None:
    api = worker(loader, "w", loader.sdk("t1", user_id="u1", authenticated=True))
    await api.kv_put("config", {"theme": "dark"})
    assert await api.kv_get("config") == {"theme": "dark"}
    assert await api.kv_keys() == ["config"]
    assert await api.users() == [["grace", "ada"], ["ada"]]
    assert await api.sql_notes("first", "second; DROP TABLE notes") == [
        {"body": "first"},
        {"body": "second; DROP TABLE notes"},
    ]
    # The host sees the same data through its own handles on the namespace.
    assert await loader.kv("t1").get("config", type="json") == {"theme": "dark"}
    assert sorted(d["name"] for d in await loader.db("t1").list("users")) == ["ada", "grace"]
    assert await loader.sql("t1").prepare("SELECT count(*) AS n FROM notes").first("n") == 2


async def test_a_pipelined_sql_call_works(loader: Loader) -> None:
    api = worker(loader, "w", loader.sdk("t1"))
    assert await api.pipelined() == [{"?": 1}, 42]


async def test_a_batch_of_bound_statements_passed_as_promises_works(loader: Loader) -> None:
    api = worker(loader, "w", loader.sdk("t1"))
    assert await api.sql_batch_d1_style("a", "b") == [1, 1]
    assert await loader.sql("t1").prepare("SELECT body FROM notes ORDER BY id").raw() == [
        ["a"],
        ["b"],
    ]


async def test_a_read_only_worker_reads_but_every_write_is_permission_denied(
    loader: Loader,
) -> None:
    await loader.kv("t1").put("k", "from the host")
    await loader.db("t1").create("users", {"name": "ada"})
    api = worker(loader, "ro", loader.sdk("t1", permissions=("read",)))
    assert await api.attempt("kv.get") == ["ok", "from the host"]
    assert await api.attempt("db.list") == ["ok", [{"name": "ada", "id": await host_id(loader)}]]
    assert await api.attempt("sql.select") == ["ok", 1]
    assert await api.attempt("kv.put") == [DENIED, True, DENIED_KV]
    assert await api.attempt("kv.delete") == [DENIED, True, DENIED_KV]
    assert await api.attempt("db.create") == [DENIED, True, DENIED_DOCS]
    assert await api.attempt("sql.create") == [DENIED, True, DENIED_SQL]
    assert await loader.kv("t1").get("k") == "from the host"
    assert [d["name"] for d in await loader.db("t1").list("users")] == ["ada"]
    assert await loader.sql("t1").prepare("SELECT name FROM sqlite_master").raw() == []


async def test_a_read_only_worker_cannot_write_with_sql_the_host_ran_before(
    loader: Loader,
) -> None:
    host = loader.sql("t1")
    await host.exec("CREATE TABLE t (a)")
    await host.prepare("INSERT INTO t VALUES (?)").bind("by the host").run()
    api = worker(loader, "ro", loader.sdk("t1", permissions=("read",)))
    assert await api.attempt("sql.insert") == [DENIED, True, DENIED_SQL]
    assert await host.prepare("SELECT a FROM t").raw() == [["by the host"]]


async def host_id(loader: Loader) -> str:
    (doc,) = await loader.db("t1").list("users")
    return str(doc["id"])


async def test_an_uncaught_permission_denied_reaches_the_host_as_itself(loader: Loader) -> None:
    # The binding's refusal, let through by the worker's code: ``except PermissionDenied``
    # catches it at the host, as it would a binding called there.
    api = worker(loader, "ro", loader.sdk("t1", permissions=("read",)))
    with pytest.raises(PermissionDenied) as info:
        await api.raise_denied()
    assert str(info.value) == DENIED_KV
    assert "raise_denied" in "".join(info.value.__notes__)  # the worker's traceback
    assert await loader.kv("t1").get("k") is None


async def test_binding_errors_and_key_errors_arrive_in_the_worker(loader: Loader) -> None:
    api = worker(loader, "w", loader.sdk("t1"))
    assert await api.attempt("sql.bad") == [BINDING_ERROR, False, "no such table: nope"]
    assert await api.attempt("sql.attach") == [BINDING_ERROR, False, "not authorized"]
    assert await api.attempt("db.update") == ["builtins.KeyError", False, "'users/nope'"]


async def test_workers_of_different_namespaces_do_not_see_each_others_data(
    loader: Loader,
) -> None:
    one = worker(loader, "one", loader.sdk("t1"))
    two = worker(loader, "two", loader.sdk("t2"))
    await one.kv_put("k", {"by": "one"})
    assert await two.kv_get("k") is None
    assert await two.kv_keys() == []
    await two.kv_put("k", {"by": "two"})
    assert await one.kv_get("k") == {"by": "one"}
    assert await two.kv_get("k") == {"by": "two"}
    assert await one.users() == [["grace", "ada"], ["ada"]]
    assert await two.db_names("users") == []
    assert await one.sql_notes("secret") == [{"body": "secret"}]
    assert await two.attempt("sql.bad") == [BINDING_ERROR, False, "no such table: nope"]
    with pytest.raises(BindingError) as info:
        await two.sql_rows("SELECT body FROM notes")
    assert str(info.value) == "no such table: notes"
    assert await two.sql_notes("other") == [{"body": "other"}]
    assert await one.sql_rows("SELECT body FROM notes") == [["secret"]]


async def test_a_worker_without_sdk_gets_an_attribute_error_naming_env_sdk(
    loader: Loader,
) -> None:
    api = worker(loader, "bare", None)
    with pytest.raises(
        AttributeError,
        match=r"^sdk\.db is not available to this worker: the host did not bind it "
        r"\(it binds nothing via env\['SDK'\]\)(\n|$)",
    ):
        await api.touch_db()


async def test_permissions_can_differ_per_store(loader: Loader) -> None:
    sdk = loader.sdk("mixed", permissions={"kv": ["read", "write"], "db": ["read"]})
    kv, db, sql = sdk["kv"], sdk["db"], sdk["sql"]
    assert isinstance(kv, KvNamespace)
    assert isinstance(db, Documents)
    assert isinstance(sql, SqlDatabase)
    await kv.put("k", "v")
    assert await db.list("users") == []
    with pytest.raises(PermissionDenied):
        await db.create("users", {"name": "ada"})
    with pytest.raises(PermissionDenied):  # not named: no access at all
        await sql.prepare("SELECT 1").all()


async def test_equal_callers_share_binding_objects_and_get_their_own_dicts(loader: Loader) -> None:
    first = loader.sdk("t1", user_id="u1", permissions=("read",))
    again = loader.sdk("t1", user_id="u1", permissions=["read"])
    assert first is not again
    assert first["context"] is not again["context"]
    assert first == again
    assert all(first[name] is again[name] for name in ("db", "kv", "sql", "blobs", "ai"))
    # Any difference in scope gives bindings of their own, with that scope.
    for other in (
        loader.sdk("t2", user_id="u1", permissions=("read",)),
        loader.sdk("t1", user_id="u1", permissions=("read", "write")),
        loader.sdk("t1", user_id="u1", permissions={"kv": ["read"]}),
    ):
        assert all(first[name] is not other[name] for name in ("db", "kv", "sql", "blobs"))
    writer = loader.sdk("t1", user_id="u1", permissions=("read", "write"))["kv"]
    assert isinstance(writer, KvNamespace)
    await writer.put("k", "v")
    reader = first["kv"]
    assert isinstance(reader, KvNamespace)
    assert await reader.get("k") == "v"
    with pytest.raises(PermissionDenied):
        await reader.put("k", "w")
    # Another user in the same namespace and with the same rights shares the bindings and
    # sees a context of its own.
    other_user = loader.sdk("t1", user_id="u2", permissions=("read",))
    assert other_user["kv"] is first["kv"]
    assert other_user["context"] == {
        "user_id": "u2",
        "namespace": "t1",
        "authenticated": False,
        "permissions": ["read"],
    }


async def test_permissions_spelled_alike_but_granting_differently_do_not_share(
    loader: Loader,
) -> None:
    # "read" in "read" grants read; "read" in ["r", "e", "a", "d"] grants nothing.
    as_text = loader.sdk("t1", permissions="read")["kv"]
    as_letters = loader.sdk("t1", permissions=list("read"))["kv"]
    assert isinstance(as_text, KvNamespace)
    assert isinstance(as_letters, KvNamespace)
    assert as_text is not as_letters
    assert await as_text.get("k") is None
    with pytest.raises(PermissionDenied):
        await as_letters.get("k")
