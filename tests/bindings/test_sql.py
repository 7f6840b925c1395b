"""SQL databases, host side: D1's statement API and result shapes, atomic batches, scripts, bound
parameters, the authorizer, grants, the statement deadline, one file per name, SQLite's errors."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from tests.bindings._helpers import exact
from workerloader import Loader
from workerloader._errors import BindingError, PermissionDenied
from workerloader.bindings import SqlDatabase

RW = frozenset({"read", "write"})
NO_WRITE = r"^this binding may not write this database$"
NO_READ = r"^this binding may not read this database$"
NOT_AUTHORIZED = r"^not authorized$"
COUNT_TO_1E9 = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
    "SELECT count(*) AS n FROM c"
)


@pytest.fixture
async def db(loader: Loader) -> SqlDatabase:
    db = loader.sql("main")
    await db.exec("CREATE TABLE t (a)")
    return db


async def column(db: SqlDatabase, sql: str = "SELECT a FROM t ORDER BY rowid") -> list[object]:
    return [row[0] for row in await db.prepare(sql).raw()]


async def table_exists(db: SqlDatabase, name: str) -> bool:
    row = await (
        db.prepare("SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ?")
        .bind(name)
        .first("n")
    )
    return bool(row)


# ---------------------------------------------------------------------------------------------
# prepare / bind / all / first / run / raw


async def test_run_all_first_and_raw_have_d1s_result_shapes(loader: Loader) -> None:
    db = loader.sql("main")
    await db.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, score REAL, pic BLOB)")
    insert = db.prepare("INSERT INTO users (name, score, pic) VALUES (?, ?, ?)")
    result = await insert.bind("ada", 1.5, b"\x00\xff").run()
    assert set(result) == {"success", "meta"}
    assert result["success"] is True
    assert set(result["meta"]) == {"changes", "last_row_id", "duration"}
    assert (result["meta"]["changes"], result["meta"]["last_row_id"]) == (1, 1)
    assert isinstance(result["meta"]["duration"], float)
    assert result["meta"]["duration"] >= 0
    second = await insert.bind("grace", None, None).run()
    assert second["meta"]["last_row_id"] == 2

    everything = await db.prepare("SELECT * FROM users ORDER BY id").all()
    assert set(everything) == {"results", "success", "meta"}
    assert everything["success"] is True
    assert everything["results"] == [
        {"id": 1, "name": "ada", "score": 1.5, "pic": b"\x00\xff"},
        {"id": 2, "name": "grace", "score": None, "pic": None},
    ]
    by_name = db.prepare("SELECT id, name FROM users WHERE name = ?")
    assert await by_name.bind("grace").first() == {"id": 2, "name": "grace"}
    assert await by_name.bind("grace").first("id") == 2
    assert await by_name.bind("nobody").first() is None
    assert await by_name.bind("nobody").first("id") is None
    assert await db.prepare("SELECT * FROM users ORDER BY id").raw() == [
        [1, "ada", 1.5, b"\x00\xff"],
        [2, "grace", None, None],
    ]
    updated = await db.prepare("UPDATE users SET score = ?").bind(3).run()
    assert updated["meta"]["changes"] == 2


async def test_first_with_an_unknown_column_is_a_binding_error(db: SqlDatabase) -> None:
    with pytest.raises(BindingError, match=exact("no column 'nope' in the result")):
        await db.prepare("SELECT 1 AS one").first("nope")


async def test_bind_returns_a_new_statement_and_leaves_the_prepared_one_alone(
    db: SqlDatabase,
) -> None:
    statement = db.prepare("SELECT ? AS v")
    one, two = statement.bind(1), statement.bind(2)
    assert (await one.first("v"), await two.first("v")) == (1, 2)
    with pytest.raises(BindingError, match=r"^Incorrect number of bindings supplied\. "):
        await statement.first()


@pytest.mark.parametrize("value", [[1], {"a": 1}, (1,), {1}])
async def test_only_scalars_can_be_bound(db: SqlDatabase, value: object) -> None:
    with pytest.raises(
        BindingError, match=exact(f"cannot bind a {type(value).__name__}; bind scalars only")
    ):
        db.prepare("SELECT ?").bind(value)


async def test_a_statement_runs_alone_and_more_than_one_is_refused(db: SqlDatabase) -> None:
    with pytest.raises(BindingError, match=r"^You can only execute one statement at a time\.$"):
        await db.prepare("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)").run()
    assert await column(db) == []


# ---------------------------------------------------------------------------------------------
# batch


async def test_a_batch_returns_one_result_per_statement(db: SqlDatabase) -> None:
    insert = db.prepare("INSERT INTO t VALUES (?)")
    results = await db.batch(
        [insert.bind("x"), insert.bind("y"), db.prepare("SELECT a FROM t ORDER BY a")]
    )
    assert [r["success"] for r in results] == [True, True, True]
    assert [r["meta"]["changes"] for r in results[:2]] == [1, 1]
    assert results[2]["results"] == [{"a": "x"}, {"a": "y"}]


@pytest.mark.parametrize(
    ("failing", "message"),
    [
        ("INSERT INTO nope VALUES (1)", "no such table: nope"),
        ("INSERT INTO u VALUES ('taken')", "UNIQUE constraint failed: u.a"),
        ("SELECT * FROM", "incomplete input"),
    ],
)
async def test_a_batch_with_a_failing_statement_in_the_middle_has_no_effect(
    db: SqlDatabase, failing: str, message: str
) -> None:
    await db.exec("CREATE TABLE u (a UNIQUE); INSERT INTO u VALUES ('taken')")
    insert = db.prepare("INSERT INTO t VALUES (?)")
    with pytest.raises(BindingError, match=exact(message)):
        await db.batch(
            [
                insert.bind("first"),
                db.prepare("INSERT INTO u VALUES ('new')"),
                db.prepare("UPDATE t SET a = 'changed'"),
                db.prepare(failing),
                insert.bind("after"),
            ]
        )
    assert await column(db) == []
    assert await column(db, "SELECT a FROM u") == ["taken"]
    assert (await db.batch([insert.bind("ok")]))[0]["success"] is True  # still usable
    assert await column(db) == ["ok"]


async def test_a_batch_takes_only_statements_of_its_own_database(loader: Loader) -> None:
    main, other = loader.sql("main"), loader.sql("other")
    await main.exec("CREATE TABLE t (a)")
    await other.exec("CREATE TABLE t (a)")
    with pytest.raises(
        BindingError, match=exact("batch() takes statements prepared on this database")
    ):
        await main.batch(
            [main.prepare("INSERT INTO t VALUES (1)"), other.prepare("INSERT INTO t VALUES (2)")]
        )
    assert await column(main) == []
    assert await column(other) == []


async def test_a_commit_inside_a_batch_does_not_break_its_atomicity(db: SqlDatabase) -> None:
    # "all take effect or none does": a statement of the batch must not be able to end the
    # batch's transaction early and keep the statements before it (refusing COMMIT is fine).
    with pytest.raises(BindingError, match=r"^(no such table: nope|not authorized)$"):
        await db.batch(
            [
                db.prepare("INSERT INTO t VALUES ('before')"),
                db.prepare("COMMIT"),
                db.prepare("INSERT INTO nope VALUES (1)"),
            ]
        )
    assert await column(db) == []


# ---------------------------------------------------------------------------------------------
# exec


async def test_exec_runs_a_script_splitting_only_where_statements_end(loader: Loader) -> None:
    db = loader.sql("main")
    script = """
        CREATE TABLE t (a TEXT);
        CREATE TABLE log (a TEXT);
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.a || ';'); END;
        INSERT INTO t VALUES ('x;y');
        INSERT INTO t VALUES ('it''s; fine');
        -- a comment; with a semicolon
        INSERT INTO t VALUES ('z') /* and; another */
    """
    result = await db.exec(script)
    assert set(result) == {"count", "duration"}
    assert result["count"] == 6
    assert isinstance(result["duration"], float)
    assert await column(db) == ["x;y", "it's; fine", "z"]
    assert await column(db, "SELECT a FROM log ORDER BY rowid") == ["x;y;", "it's; fine;", "z;"]


async def test_exec_reports_sqlites_error_for_a_bad_statement(db: SqlDatabase) -> None:
    with pytest.raises(BindingError, match=exact("no such table: nope")):
        await db.exec("INSERT INTO t VALUES (1); INSERT INTO nope VALUES (2)")


# ---------------------------------------------------------------------------------------------
# Parameters are data


async def test_sql_injection_through_a_parameter_is_inert(db: SqlDatabase) -> None:
    payload = "x'); DROP TABLE t; --"
    await db.prepare("INSERT INTO t VALUES (?)").bind(payload).run()
    assert await table_exists(db, "t")
    assert await column(db) == [payload]
    where = db.prepare("SELECT a FROM t WHERE a = ?")
    assert (await where.bind("' OR '1'='1").all())["results"] == []
    assert await where.bind("' OR '1'='1").raw() == []
    assert await where.bind(payload).first("a") == payload
    await db.batch([db.prepare("INSERT INTO t VALUES (?)").bind("1); DROP TABLE t; --")])
    assert await column(db) == [payload, "1); DROP TABLE t; --"]


# ---------------------------------------------------------------------------------------------
# The authorizer


async def test_attach_is_refused_and_creates_no_file(db: SqlDatabase, tmp_path: Path) -> None:
    target = tmp_path / "other.sqlite3"
    for run in (
        db.prepare(f"ATTACH DATABASE '{target}' AS other").run,
        db.prepare("ATTACH DATABASE ? AS other").bind(str(target)).run,
        lambda: db.exec(f"ATTACH '{target}' AS other"),
    ):
        with pytest.raises(BindingError, match=NOT_AUTHORIZED):
            await run()
    assert not target.exists()
    with pytest.raises(BindingError, match=NOT_AUTHORIZED):
        await db.prepare("DETACH DATABASE other").run()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("PRAGMA writable_schema=1", "not authorized"),
        ("PRAGMA writable_schema", "not authorized"),
        ("PRAGMA journal_mode=DELETE", "not authorized"),
        ("PRAGMA query_only=0", "not authorized"),
        ("PRAGMA trusted_schema=1", "not authorized"),
        ("SELECT load_extension('x')", "not authorized to use function: load_extension"),
        ("SELECT LOAD_EXTENSION('x', 'e')", "not authorized to use function: LOAD_EXTENSION"),
    ],
)
async def test_dangerous_pragmas_and_load_extension_are_not_authorized(
    db: SqlDatabase, sql: str, message: str
) -> None:
    with pytest.raises(BindingError, match=exact(message)):
        await db.prepare(sql).all()
    with pytest.raises(BindingError, match=exact(message)):
        await db.exec(sql)
    await db.prepare("INSERT INTO t VALUES (1)").run()  # the database still works
    assert await column(db) == [1]


async def test_vacuum_into_a_file_is_refused(db: SqlDatabase, tmp_path: Path) -> None:
    target = tmp_path / "copy.sqlite3"
    with pytest.raises(BindingError, match=r"^(authorization denied|not authorized)$"):
        await db.exec(f"VACUUM INTO '{target}'")
    assert not target.exists()


async def test_read_only_introspection_pragmas_work(loader: Loader) -> None:
    db = loader.sql("main")
    await db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    for handle in (db, loader.sql("main", write=False)):
        info = await handle.prepare("PRAGMA table_info(t)").all()
        assert [(c["name"], c["type"], c["notnull"], c["pk"]) for c in info["results"]] == [
            ("id", "INTEGER", 0, 1),
            ("name", "TEXT", 1, 0),
        ]
        assert await handle.prepare("PRAGMA user_version").first("user_version") == 0


# ---------------------------------------------------------------------------------------------
# Grants


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (2)",
        "UPDATE t SET a = 2",
        "DELETE FROM t",
        "CREATE TABLE u (a)",
        "CREATE TEMP TABLE u (a)",
        "CREATE INDEX i ON t (a)",
        "CREATE VIEW v AS SELECT a FROM t",
        "DROP TABLE t",
        "ALTER TABLE t ADD COLUMN b",
        "REPLACE INTO t VALUES (3)",
    ],
)
async def test_a_read_only_grant_selects_but_cannot_write(
    loader: Loader, db: SqlDatabase, sql: str
) -> None:
    await db.prepare("INSERT INTO t VALUES (1)").run()
    ro = loader.sql("main", write=False)
    assert await ro.prepare("SELECT a FROM t").raw() == [[1]]
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.prepare(sql).run()
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.exec(sql)
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.batch([ro.prepare(sql)])
    assert await column(db) == [1]
    assert await column(db, "SELECT name FROM sqlite_master") == ["t"]


async def test_a_write_only_grant_cannot_even_select(loader: Loader, db: SqlDatabase) -> None:
    wo = loader.sql("main", read=False)
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.prepare("SELECT a FROM t").all()
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.prepare("INSERT INTO t VALUES (1)").run()
    assert await column(db) == []


async def test_a_read_only_grant_cannot_write_with_sql_a_writer_ran_before(
    loader: Loader, db: SqlDatabase
) -> None:
    insert = "INSERT INTO t VALUES (?)"
    await db.prepare(insert).bind("by the writer").run()
    ro = loader.sql("main", write=False)
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.prepare(insert).bind("by the reader").run()
    assert await column(db) == ["by the writer"]


async def test_a_read_only_grant_cannot_change_the_database_with_a_pragma(
    loader: Loader, db: SqlDatabase
) -> None:
    ro = loader.sql("main", write=False)
    with pytest.raises((PermissionDenied, BindingError), match=f"{NO_WRITE}|{NOT_AUTHORIZED}"):
        await ro.exec("PRAGMA user_version = 7")
    assert await db.prepare("PRAGMA user_version").first("user_version") == 0


async def test_a_read_only_grant_cannot_switch_off_foreign_keys_for_writers(
    loader: Loader,
) -> None:
    db = loader.sql("main")
    await db.exec(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (parent INTEGER REFERENCES parent (id))"
    )
    ro = loader.sql("main", write=False)
    with pytest.raises((PermissionDenied, BindingError), match=f"{NO_WRITE}|{NOT_AUTHORIZED}"):
        await ro.exec("PRAGMA foreign_keys = OFF")
    with pytest.raises(BindingError, match=r"^FOREIGN KEY constraint failed$"):
        await db.prepare("INSERT INTO child VALUES (42)").run()


async def test_a_transaction_a_caller_opens_does_not_swallow_other_callers_writes(
    loader: Loader, db: SqlDatabase
) -> None:
    # A read-only caller sends BEGIN; a writer's INSERT then reports success. That write must
    # be committed: visible to another connection, and not undone by a later failing statement.
    with contextlib.suppress(PermissionDenied, BindingError):
        await loader.sql("main", write=False).exec("BEGIN")
    assert (await db.prepare("INSERT INTO t VALUES ('kept')").run())["success"] is True
    with contextlib.closing(sqlite3.connect(loader.data_dir / "sql" / "main.sqlite3")) as conn:
        assert conn.execute("SELECT a FROM t").fetchall() == [("kept",)]
    with pytest.raises(BindingError, match=exact("no such table: nope")):
        await db.prepare("SELECT * FROM nope").all()
    assert await column(db) == ["kept"]


# ---------------------------------------------------------------------------------------------
# The deadline


async def test_a_long_query_is_interrupted_at_the_deadline_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    db = SqlDatabase.open(tmp_path / "slow.sqlite3", RW, deadline_s=0.2)
    await db.exec("CREATE TABLE t (a)")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    started = time.monotonic()
    try:
        with pytest.raises(BindingError, match=exact("SQL statement interrupted after 0.2 s")):
            await db.prepare(COUNT_TO_1E9).first("n")
    finally:
        ticker.cancel()
    elapsed = time.monotonic() - started
    assert 0.15 < elapsed < 2.0
    assert ticks >= 5  # the query ran in a thread; the event loop kept running
    await db.prepare("INSERT INTO t VALUES (1)").run()
    assert await db.prepare("SELECT count(*) AS n FROM t").first("n") == 1


async def test_each_statement_gets_its_own_deadline(tmp_path: Path) -> None:
    db = SqlDatabase.open(tmp_path / "slow.sqlite3", RW, deadline_s=0.2)
    quick = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) "
    for _ in range(3):
        with pytest.raises(BindingError, match=r"^SQL statement interrupted after 0\.2 s$"):
            await db.prepare(COUNT_TO_1E9).raw()
        assert await db.prepare(quick + "SELECT count(*) FROM c").raw() == [[1000]]


async def test_a_call_that_waits_out_its_deadline_in_line_says_it_never_ran(
    tmp_path: Path,
) -> None:
    # Three slow calls queued on one database: the last waits 0.4 s for its turn. It said
    # "interrupted after 0.2 s", as if it had run.
    db = SqlDatabase.open(tmp_path / "slow.sqlite3", RW, deadline_s=0.2)
    calls = [db.prepare(COUNT_TO_1E9).raw() for _ in range(3)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    messages = [str(e) for e in outcomes]
    assert messages[0] == "SQL statement interrupted after 0.2 s"
    assert messages[2].startswith("the SQL call could not start before its deadline: the "), (
        messages
    )


async def test_an_interrupted_batch_leaves_no_effect(tmp_path: Path) -> None:
    db = SqlDatabase.open(tmp_path / "slow.sqlite3", RW, deadline_s=0.2)
    await db.exec("CREATE TABLE t (a)")
    with pytest.raises(BindingError, match=r"^SQL statement interrupted after 0\.2 s$"):
        await db.batch([db.prepare("INSERT INTO t VALUES (1)"), db.prepare(COUNT_TO_1E9)])
    assert await db.prepare("SELECT count(*) AS n FROM t").first("n") == 0
    await db.batch([db.prepare("INSERT INTO t VALUES (2)")])
    assert await db.prepare("SELECT a FROM t").raw() == [[2]]


# ---------------------------------------------------------------------------------------------
# Names


async def test_each_name_is_its_own_database_file(loader: Loader) -> None:
    a, b = loader.sql("a"), loader.sql("b")
    await a.exec("CREATE TABLE t (a); INSERT INTO t VALUES ('in a')")
    with pytest.raises(BindingError, match=exact("no such table: t")):
        await b.prepare("SELECT * FROM t").all()
    await b.exec("CREATE TABLE t (a); INSERT INTO t VALUES ('in b')")
    assert await column(a) == ["in a"]
    assert await column(b) == ["in b"]
    assert await column(loader.sql("a")) == ["in a"]  # the same name is the same database
    assert sorted(p.name for p in (loader.data_dir / "sql").glob("*.sqlite3")) == [
        "a.sqlite3",
        "b.sqlite3",
    ]
    assert await column(Loader(loader.data_dir).sql("b")) == ["in b"]  # and it is durable


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "a..b", "a\n"])
def test_an_invalid_database_name_is_refused(loader: Loader, name: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid namespace or name "):
        loader.sql(name)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT * FROM nope", "no such table: nope"),
        ("SELECT nope FROM t", "no such column: nope"),
        ("SELEC 1", 'near "SELEC": syntax error'),
        ("INSERT INTO u VALUES (1)", "UNIQUE constraint failed: u.a"),
        ("INSERT INTO u VALUES (NULL)", "NOT NULL constraint failed: u.a"),
    ],
)
async def test_errors_carry_sqlites_message(db: SqlDatabase, sql: str, message: str) -> None:
    await db.exec("CREATE TABLE u (a NOT NULL UNIQUE); INSERT INTO u VALUES (1)")
    with pytest.raises(BindingError, match=exact(message)):
        await db.prepare(sql).all()
    with pytest.raises(BindingError, match=exact(message)):
        await db.exec(sql)
    with pytest.raises(BindingError, match=exact(message)):
        await db.batch([db.prepare(sql)])


async def test_sql_longer_than_the_limit_is_refused(db: SqlDatabase) -> None:
    long = "SELECT 1" + " " * 100_000
    with pytest.raises(BindingError, match=r"^sql must be a string of at most 100000 characters$"):
        db.prepare(long)
    with pytest.raises(
        BindingError, match=r"^script must be a string of at most 100000 characters$"
    ):
        await db.exec(long)
