"""SQL databases against a hostile caller, host side: what one statement may make the host build
(SQLite's length limits), hold (a budget per call, checked row by row), leave behind (no open
transaction, whatever fails) and spend before SQLite runs (exec's split is one pass)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.bindings._helpers import DESCRIBE, exact
from workerloader import Loader, WorkerCode, WorkerStub
from workerloader._errors import BindingError
from workerloader.bindings import SqlDatabase
from workerloader.bindings._sql import SqlLimits, _split

RW = frozenset({"read", "write"})
TOO_BIG = "string or blob too big: SQL strings and blobs may be at most 8388608 bytes"
PAGE = (
    "in one call; add LIMIT to the query, or page through it with LIMIT and OFFSET "
    "(or WHERE on the last key seen)"
)
TOO_MANY_VALUES = (
    f"SQL result too large: more than 200000 values (rows times columns, plus one per row) {PAGE}"
)
BIGINT = (
    "cannot bind an int outside the signed 64-bit range (-2**63 to 2**63 - 1) SQLite stores; "
    "bind it as a str"
)


def rows(n: int, select: str = "x") -> str:
    """A query for ``n`` rows of ``select`` over ``x`` = 1, 2, …"""
    return (
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {n}) "
        f"SELECT {select} FROM c"
    )


def fails_after(n: int) -> str:
    """Rows 1..n, then a row SQLite cannot compute: a caller that fetched every row before it
    looked at their size gets ``integer overflow``, one that stopped earlier does not."""
    return rows(1_000_000, f"CASE WHEN x > {n} THEN abs(-9223372036854775808) ELSE x END AS x")


def outside(db_file: Path) -> list[Any]:
    """The rows of ``t`` as another connection sees them: only what was committed."""
    with contextlib.closing(sqlite3.connect(db_file)) as conn:
        return [row[0] for row in conn.execute("SELECT a FROM t ORDER BY rowid")]


def small(tmp_path: Path, **limits: int) -> SqlDatabase:
    return SqlDatabase.open(tmp_path / "small.sqlite3", RW, limits=SqlLimits(**limits))


# ---------------------------------------------------------------------------------------------
# SQLite builds no value and prepares no statement over its limit


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT zeroblob(9000000) AS b",
        "SELECT randomblob(9000000) AS b",
        "SELECT length(zeroblob(4194304) || zeroblob(4194305)) AS b",
    ],
)
async def test_a_value_over_8_mib_is_refused_by_sqlite(loader: Loader, sql: str) -> None:
    db = loader.sql("main")
    statement = db.prepare(sql)
    for call in (statement.all, statement.raw, statement.run, statement.first):
        with pytest.raises(BindingError, match=exact(TOO_BIG)):
            await call()
    with pytest.raises(BindingError, match=exact(TOO_BIG)):
        await db.batch([statement])
    with pytest.raises(BindingError, match=exact(TOO_BIG)):
        await db.exec(f"CREATE TABLE t (b); INSERT INTO t {sql}")
    assert await db.prepare("SELECT length(zeroblob(8388608)) AS n").first("n") == 8 << 20


async def test_a_bound_value_over_the_limit_is_refused(tmp_path: Path) -> None:
    db = small(tmp_path, max_value_bytes=1000)
    echo = db.prepare("SELECT length(?) AS n")
    assert await echo.bind("x" * 1000).first("n") == 1000
    for value in ("x" * 1001, b"x" * 1001):
        with pytest.raises(
            BindingError,
            match=exact("string or blob too big: SQL strings and blobs may be at most 1000 bytes"),
        ):
            await echo.bind(value).first()


async def test_a_statement_over_its_byte_limit_is_refused(tmp_path: Path) -> None:
    db = small(tmp_path, max_sql_bytes=100)
    long = "SELECT 1 AS one -- " + "é" * 50  # 69 characters, 119 bytes of UTF-8
    message = exact("SQL statement too long: at most 100 bytes of UTF-8")
    with pytest.raises(BindingError, match=message):
        await db.prepare(long).all()
    with pytest.raises(BindingError, match=message):
        await db.exec(long)
    assert await db.prepare("SELECT 1 AS one -- " + "e" * 50).first("one") == 1


@pytest.mark.parametrize("field", ["max_value_bytes", "max_result_values"])
def test_a_limit_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=exact(f"SqlLimits.{field} must be at least 1")):
        SqlLimits(**{field: 0})


# ---------------------------------------------------------------------------------------------
# A result is fetched against a budget, and fetching stops at it


async def test_a_result_over_the_value_budget_stops_fetching(tmp_path: Path) -> None:
    # 1000 values is 500 rows of one column; the query breaks at row 1001.
    db = small(tmp_path, max_result_values=1000)
    huge = db.prepare(fails_after(1000))
    message = exact(
        f"SQL result too large: more than 1000 values (rows times columns, plus one per row) {PAGE}"
    )
    for call in (huge.all, huge.raw):
        with pytest.raises(BindingError, match=message):
            await call()
    with pytest.raises(BindingError, match=message):
        await db.batch([huge])
    assert len(await db.prepare(rows(500)).raw()) == 500
    assert (await db.prepare(rows(5000)).run())["success"] is True  # run() keeps no rows


async def test_a_result_over_the_byte_budget_is_refused(tmp_path: Path) -> None:
    db = small(tmp_path, max_result_bytes=10_000)
    wide = "x, printf('%100s', x) AS s"  # 8 + 100 + 8 bytes a row as a list
    assert len(await db.prepare(rows(86, wide)).raw()) == 86
    message = exact(f"SQL result too large: more than 10000 bytes {PAGE}")
    with pytest.raises(BindingError, match=message):
        await db.prepare(rows(87, wide)).raw()
    with pytest.raises(BindingError, match=message):
        await db.prepare(fails_after(1000)).all()  # stopped before the row that breaks


async def test_column_names_count_for_rows_as_dicts(tmp_path: Path) -> None:
    db = small(tmp_path, max_result_bytes=2000)
    named = db.prepare(rows(10, "x AS " + "n" * 200))  # 16 bytes a row as a list, 224 as a dict
    assert len(await named.raw()) == 10
    with pytest.raises(BindingError, match=r"^SQL result too large: more than 2000 bytes "):
        await named.all()


async def test_a_batch_shares_one_budget_and_has_no_effect_past_it(tmp_path: Path) -> None:
    db = small(tmp_path, max_result_values=100)
    await db.exec("CREATE TABLE t (a)")
    thirty = db.prepare(rows(30))  # 60 values
    assert len((await db.batch([thirty]))[0]["results"]) == 30
    with pytest.raises(BindingError, match=r"^SQL result too large: more than 100 values "):
        await db.batch([db.prepare("INSERT INTO t VALUES ('lost')"), thirty, thirty])
    await db.prepare("INSERT INTO t VALUES ('kept')").run()
    assert outside(tmp_path / "small.sqlite3") == ["kept"]


async def test_first_fetches_only_the_first_row(tmp_path: Path) -> None:
    db = small(tmp_path, max_result_values=2)
    assert await db.prepare(fails_after(2)).first() == {"x": 1}
    assert await db.prepare(fails_after(2)).first("x") == 1


async def test_first_has_the_result_budget_too(tmp_path: Path) -> None:
    # A first row of many big values went back whole (457 MiB through first()).
    db = small(tmp_path, max_result_bytes=1000)
    with pytest.raises(BindingError, match="SQL result too large"):
        await db.prepare("SELECT zeroblob(600) AS a, zeroblob(600) AS b").first()
    assert await db.prepare("SELECT zeroblob(600) AS a").first("a") == bytes(600)


# ---------------------------------------------------------------------------------------------
# No transaction outlives the call that opened it


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70, -(2**200)])
async def test_an_int_outside_64_bits_is_refused_at_bind(loader: Loader, value: int) -> None:
    with pytest.raises(BindingError, match=exact(BIGINT)):
        loader.sql("main").prepare("SELECT ?").bind(value)


async def test_the_64_bit_bounds_bind(loader: Loader) -> None:
    echo = loader.sql("main").prepare("SELECT ? AS v")
    for value in (2**63 - 1, -(2**63)):
        assert await echo.bind(value).first("v") == value


async def test_a_batch_that_fails_outside_sqlite_leaves_no_transaction_open(
    loader: Loader,
) -> None:
    # A str SQLite cannot take fails in sqlite3 with a UnicodeEncodeError, not a sqlite3.Error:
    # the shared connection must still leave the batch's transaction.
    db = loader.sql("main")
    await db.exec("CREATE TABLE t (a)")
    insert = db.prepare("INSERT INTO t VALUES (?)")
    with pytest.raises(UnicodeEncodeError):
        await db.batch([insert.bind("lost"), insert.bind("\ud800")])
    assert (await insert.bind("kept").run())["success"] is True
    db_file = loader.data_dir / "sql" / "main.sqlite3"
    assert outside(db_file) == ["kept"]
    with pytest.raises(BindingError, match=exact("no such table: nope")):
        await loader.sql("main", write=False).prepare("SELECT * FROM nope").all()
    assert outside(db_file) == ["kept"]


# ---------------------------------------------------------------------------------------------
# exec splits a script in one pass


async def test_exec_splits_only_at_semicolons_that_end_a_statement(loader: Loader) -> None:
    db = loader.sql("main")
    script = """
        CREATE TABLE "t;1" ("a;b" TEXT, [c;d] TEXT, `e;f` TEXT);
        CREATE TABLE log (a TEXT);;
        CREATE TEMP TRIGGER tr AFTER INSERT ON "t;1" BEGIN
            INSERT INTO log VALUES ('one;');  -- end;
            INSERT INTO log VALUES ("two;");
        END;
        /* ; */ INSERT INTO "t;1" VALUES ('x;y', 'it''s;', "z;") -- ;
        ; SELECT 1 AS "end;" ; SELECT ';;;'
    """
    assert (await db.exec(script))["count"] == 6
    assert await db.prepare('SELECT * FROM "t;1"').raw() == [["x;y", "it's;", "z;"]]
    assert await db.prepare("SELECT a FROM log ORDER BY rowid").raw() == [["one;"], ["two;"]]


async def test_exec_does_not_rescan_a_statement_at_each_semicolon(
    loader: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Asking sqlite3.complete_statement about the growing statement at each ";" inside one
    # string literal read 5 * 10**9 characters (3 s of host CPU) for this 100 kB script.
    script = "SELECT '" + ";" * 99_980 + "' AS s"
    scanned = 0
    complete = sqlite3.complete_statement

    def counting(sql: str) -> bool:
        nonlocal scanned
        scanned += len(sql)
        return complete(sql)

    monkeypatch.setattr(sqlite3, "complete_statement", counting)
    assert (await loader.sql("main").exec(script))["count"] == 1
    assert scanned <= 2 * len(script)


def _split_by_complete_statement(script: str) -> list[str]:
    """The split exec made before it was one pass: the reference ``_split`` must agree with."""
    statements, current = [], ""
    for piece in script.split(";"):
        current = f"{current};{piece}" if current else piece
        if sqlite3.complete_statement(current + ";"):
            if current.strip():
                statements.append(current + ";")
            current = ""
    if current.strip():
        statements.append(current)
    return statements


def test_the_split_agrees_with_sqlite3_complete_statement() -> None:
    atoms = [";", ";", "'", '"', "`", "[", "]", "--", "\n", "/*", "*/", " ", "\t", "\v", "-"]
    atoms += ["/", "*", "x", "1", "é", "\u212a", "BEGIN", "end", "END", "endx", "Create"]
    atoms += ["CREATE", "trigger", "TRIGGER", "temp", "TEMPORARY", "EXPLAIN", "explain"]
    rng = random.Random(7)
    for _ in range(5000):
        script = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        expected = _split_by_complete_statement(script)
        got = _split(script)
        if got and expected and expected[-1] == got[-1] + ";" and not script.endswith(";"):
            got[-1] += ";"  # the old split added a ";" to a complete last statement
        assert got == expected, script


# ---------------------------------------------------------------------------------------------
# End to end: a worker in the real sandbox


MAIN = (
    """
from workers import WorkerEntrypoint, sdk

"""
    + DESCRIBE
    + """

class Api(WorkerEntrypoint):
    async def all(self, sql):
        return await describe(sdk.sql.prepare(sql).all())

    async def batch_bigint(self):
        return await describe(sdk.sql.batch([sdk.sql.prepare("SELECT ?").bind(2**70)]))

    async def insert(self, value):
        return await describe(sdk.sql.prepare("INSERT INTO t VALUES (?)").bind(value).run())
"""
)
BINDING_ERROR = "workerloader._errors.BindingError"


@pytest.fixture
async def sandboxed(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


def api(loader: Loader, worker_id: str, permissions: tuple[str, ...]) -> Any:
    sdk = loader.sdk("t1", permissions=permissions)

    def code() -> WorkerCode:
        return WorkerCode(main_module="main.py", modules={"main.py": MAIN}, env={"SDK": sdk})

    stub: WorkerStub = loader.get(worker_id, code)
    return stub.get_entrypoint("Api")


async def test_a_worker_gets_a_typed_error_for_a_result_too_large(sandboxed: Loader) -> None:
    worker = api(sandboxed, "w", ("read", "write"))
    assert await worker.all("SELECT zeroblob(9000000) AS b") == [BINDING_ERROR, False, TOO_BIG]
    assert await worker.all(fails_after(150_000)) == [BINDING_ERROR, False, TOO_MANY_VALUES]
    ok = await worker.all(rows(3))
    assert ok[0] == "ok"
    assert ok[1]["results"] == [{"x": 1}, {"x": 2}, {"x": 3}]


async def test_a_read_only_worker_cannot_leave_a_transaction_open(sandboxed: Loader) -> None:
    # It used to: batch() with an int past 64 bits raised OverflowError inside BEGIN IMMEDIATE;
    # a writer's INSERT then reported success uncommitted, and the reader's next error undid it.
    await sandboxed.sql("t1").exec("CREATE TABLE t (a)")
    reader = api(sandboxed, "reader", ("read",))
    writer = api(sandboxed, "writer", ("read", "write"))
    assert await reader.batch_bigint() == [BINDING_ERROR, False, BIGINT]
    assert (await writer.insert(7))[0] == "ok"
    db_file = sandboxed.data_dir / "sql" / "t1.sqlite3"
    assert outside(db_file) == [7]
    assert await reader.all("SELEC") == [BINDING_ERROR, False, 'near "SELEC": syntax error']
    assert outside(db_file) == [7]


# ---------------------------------------------------------------------------------------------
# Statements a caller keeps hold host memory: a budget per database


async def test_held_statements_have_a_budget_freed_as_they_are_let_go(tmp_path: Path) -> None:
    # A worker keeping 10,000 statements of 100 KB (or binding MBs to each) held GBs.
    db = small(tmp_path, max_held_bytes=1000)
    kept = [db.prepare("SELECT ?" + " " * 300)]
    kept.append(kept[0].bind("x" * 300))
    with pytest.raises(BindingError, match="held on this database keep over 1000 bytes"):
        kept.append(kept[0].bind("y" * 300))
    with pytest.raises(BindingError, match="held on this database"):
        db.prepare("SELECT 1" + " " * 400)
    del kept[1]  # let go (a worker dropping its stub releases the host's statement)
    gc.collect()
    again = kept[0].bind("y" * 300)
    assert (await again.all())["results"] == [{"?": "y" * 300}]


# ---------------------------------------------------------------------------------------------
# SQLite's memory, all databases together, has a ceiling: a row of many big values hits it

WIDE_ROW = """
import asyncio, sys
from pathlib import Path
from workerloader.bindings import _sqlite
_sqlite.HEAP_LIMIT_BYTES = 48 << 20  # as the host's 1 GiB, scaled down
from workerloader.bindings._sql import SqlDatabase
from workerloader._errors import BindingError

async def main():
    db = SqlDatabase.open(Path(sys.argv[1]), frozenset({"read", "write"}))
    columns = ", ".join(f"randomblob(8000000) AS c{i}" for i in range(10))  # 80 MB a row
    try:
        await db.prepare(f"SELECT {columns}").all()
    except BindingError as exc:
        print("refused:", exc)
    print("then:", (await db.prepare("SELECT 1 AS one").all())["results"])

asyncio.run(main())
"""


def test_a_row_past_sqlites_heap_limit_is_refused_not_held(tmp_path: Path) -> None:
    # Each value is under its 8 MiB cap; together they took the host's memory (20 columns:
    # 341 MB; 2,000 allowed). In a process of its own: the limit is process-wide.
    script = tmp_path / "wide.py"
    script.write_text(WIDE_ROW)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "wide.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"refused: SQLite ran out of the memory the host gives it ({48 << 20} bytes, all "
        "databases together): ask for less at once (fewer or smaller columns, fewer rows)",
        "then: [{'one': 1}]",
    ]


# ---------------------------------------------------------------------------------------------
# One database's queue of statements does not hold the threads every binding shares


async def test_a_burst_on_one_database_leaves_threads_for_the_others(tmp_path: Path) -> None:
    busy = SqlDatabase.open(tmp_path / "a.sqlite3", RW)
    other = SqlDatabase.open(tmp_path / "b.sqlite3", RW)
    slow = rows(300_000, "count(*) AS n")  # a few hundredths of a second each, one at a time
    done: list[str] = []

    async def burst(i: int) -> None:
        await busy.prepare(slow).all()
        done.append(f"a{i}")

    async def quick() -> None:
        await other.prepare("SELECT 1 AS one").all()
        done.append("b")

    # 20 statements queued on one database before the other's one: they used to wait for
    # the lock in the pool's threads, and the other database's statement behind all of them.
    tasks = [asyncio.ensure_future(burst(i)) for i in range(20)]
    await asyncio.sleep(0)
    await asyncio.gather(*tasks, quick())
    assert done.index("b") < 10, done
