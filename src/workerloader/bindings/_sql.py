"""SQL: a D1-like database per name (``prepare(sql).bind(...).all()``, ``batch``, ``exec``).

Statements come from workers, so each database runs under an authorizer (no ATTACH, no extension
loading, no PRAGMA beyond read-only introspection), parameters are always bound, and a statement
still running at its deadline is interrupted. Statements run in a thread, one at a time per
database, so a slow query never stalls the host's event loop.

What a statement may make the host hold is bounded by ``SqlLimits``: SQLite itself refuses a
value or a statement over its size, and rows are fetched one at a time against a budget per
call, so a result too large to send to a worker fails before the host has built it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from .._errors import BindingError, PermissionDenied, QuotaExceeded
from ..rpc import RpcTarget
from . import _sqlite
from ._quota import QUOTA_ADVICE
from ._sqlite import (
    Authorizer,
    Grants,
    check_grant,
    control,
    guarded,
    open_database,
)
from ._tasks import holding

__all__ = ["SqlDatabase", "SqlLimits", "Statement"]

MAX_SQL_CHARS: Final = 100_000
_PARAM_TYPES: Final = (type(None), int, float, str, bytes)
_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 63) - 1
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class SqlLimits:
    """What one call to a SQL database may make the host hold. The defaults fit what one
    message to a worker carries (4 MiB)."""

    max_value_bytes: int = 8 << 20
    """Longest string or blob SQLite will build or store (``SQLITE_LIMIT_LENGTH``); beyond it a
    statement fails with ``string or blob too big`` instead of growing the host."""

    max_sql_bytes: int = 1 << 20
    """Longest statement SQLite will prepare (``SQLITE_LIMIT_SQL_LENGTH``), in UTF-8 bytes. A
    backstop: ``prepare`` and ``exec`` already refuse text over ``MAX_SQL_CHARS`` characters."""

    max_result_bytes: int = (4 << 20) - (64 << 10)
    """Most bytes of rows one call returns (``all``, ``raw``, or a whole ``batch``), counted
    cheaply: the length of each str or bytes, 8 for anything else, 8 per row and, for rows as
    dicts, each column name again. Just under 4 MiB, so what passes fits one message."""

    max_result_values: int = 200_000
    """Most values one call returns, counting one more per row (``RpcLimits.max_objects``
    counts a result the same way), which also caps the rows at half of it."""

    max_held_bytes: int = 64 << 20
    """Most bytes of SQL text and bound values that the prepared statements callers hold on
    one database keep on the host (a worker holding 10,000 statements of 100 KB each kept a
    GB). Past it ``prepare`` and ``bind`` refuse until statements are let go; one database is
    one namespace's, so only its own callers can run it down."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"SqlLimits.{name} must be at least 1")


_DEFAULT_LIMITS: Final = SqlLimits()


class _Db:
    def __init__(
        self, path: Path, deadline_s: float, limits: SqlLimits, quota_bytes: int | None
    ) -> None:
        self.authorizer = Authorizer()
        self.conn = open_database(path, self.authorizer, quota_bytes)
        self.quota_bytes = quota_bytes
        self.what = f"the SQL database {path.stem!r}"
        # SQLite checks these as it builds a value or prepares a statement, so a worker's
        # ``zeroblob(900000000)`` fails in SQLite before any memory is taken for it.
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limits.max_value_bytes)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, limits.max_sql_bytes)
        self.lock = threading.Lock()
        self.turn = asyncio.Lock()  # taken before a thread is: see run
        self.deadline_s = deadline_s
        self.limits = limits
        self.held_bytes = 0  # by live statements (see SqlLimits.max_held_bytes)

    def hold(self, statement: Statement, size: int) -> None:
        """Count ``size`` bytes as held while ``statement`` lives; BindingError past the
        database's ``max_held_bytes``."""
        if self.held_bytes + size > self.limits.max_held_bytes:
            raise BindingError(
                f"the prepared statements held on this database keep over "
                f"{self.limits.max_held_bytes} bytes of SQL and bound values: let go of the "
                "ones you are done with (drop them), or bind fewer, smaller values"
            )
        self.held_bytes += size
        weakref.finalize(statement, self._let_go, size)

    def _let_go(self, size: int) -> None:
        self.held_bytes -= size

    async def run(self, grants: Grants, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in a thread, alone on this database, under the caller's grants.

        Whatever ``work`` raises, the connection every caller shares leaves any transaction it
        was in rolled back. SQLite's errors become ``BindingError`` (``PermissionDenied`` for a
        write the grants refuse); any other exception passes through as it is.
        """
        check_grant(grants, "read", "this database")

        guard = guarded(self.conn, self.deadline_s)  # reads the calling worker's deadline

        def locked() -> _T:
            with self.lock, guard:
                if guard.expired():  # it waited its turn past the deadline: never ran
                    raise BindingError(
                        "the SQL call could not start before its deadline: the database was "
                        "busy with other calls the whole time (the calling worker's wall time "
                        f"or {self.deadline_s:g} s); try again, or make its other calls shorter"
                    )
                self.authorizer.allow_write = "write" in grants
                self.authorizer.refused_write = False
                try:
                    # Only a ROLLBACK that failed leaves a transaction open between calls;
                    # nothing may run inside it, or its writes would be another caller's to
                    # commit or undo.
                    self._rollback()
                    return work(self.conn)
                except BaseException as exc:
                    full = self._full() if _code(exc) == sqlite3.SQLITE_FULL else None
                    # Not only sqlite3.Error: an OverflowError from a parameter, a result over
                    # its budget or a thread's KeyboardInterrupt would otherwise leave a batch's
                    # BEGIN IMMEDIATE open, and every later caller's write inside it.
                    with contextlib.suppress(sqlite3.Error):  # the next call tries again
                        self._rollback()
                    if full is not None:
                        raise full from None
                    if isinstance(exc, MemoryError):  # SQLITE_NOMEM: its heap limit
                        raise BindingError(
                            "SQLite ran out of the memory the host gives it "
                            f"({_sqlite.HEAP_LIMIT_BYTES} bytes, all databases together): ask "
                            "for less at once (fewer or smaller columns, fewer rows)"
                        ) from None
                    if not isinstance(exc, sqlite3.Error):
                        raise
                    raise self._error(exc, guard.by_call) from None

        # Callers queue here, on the event loop, not in a pool thread: waiting for the lock in
        # threads, one namespace's burst of slow statements held every thread of the pool
        # that all bindings share (another tenant's blob write waited 9 s).
        # A caller that is gone leaves its statement running: the turn stays taken until its
        # thread is done (released at once, the next caller's thread would wait in the pool
        # for the lock). The statement ends by its deadline.
        return await holding(self.turn, lambda: asyncio.to_thread(locked))

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            control(self.conn, "ROLLBACK", self.authorizer)

    def _error(self, exc: sqlite3.Error, by_call: bool) -> BindingError | PermissionDenied:
        """The error a caller sees for SQLite's ``exc``."""
        if self.authorizer.refused_write:
            return PermissionDenied("this binding may not write this database")
        if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
            if by_call:
                return BindingError(
                    "SQL statement interrupted: the calling worker's wall time ran out"
                )
            return BindingError(f"SQL statement interrupted after {self.deadline_s:g} s")
        if isinstance(exc, sqlite3.DataError) and str(exc) == "query string is too large":
            # sqlite3's own check of SQLITE_LIMIT_SQL_LENGTH, before SQLite sees the text.
            return BindingError(
                f"SQL statement too long: at most {self.limits.max_sql_bytes} bytes of UTF-8"
            )
        if _code(exc) == sqlite3.SQLITE_TOOBIG:
            return BindingError(
                f"{exc}: SQL strings and blobs may be at most {self.limits.max_value_bytes} bytes"
            )
        return BindingError(str(exc))

    def _full(self) -> BindingError:
        """The error for SQLITE_FULL: the database or its temporary tables at the quota
        (``max_page_count``), or else the host's disk full."""
        quota = self.quota_bytes
        if quota is None:
            return BindingError(f"{self.what} could not grow: the host's disk is full")
        # SQLite has undone the failed statement's pages by now: which of the two it filled
        # is not known, so both are named.
        holds = "or its temporary tables are full"
        self.conn.set_authorizer(None)  # the page counts are the host's to read
        try:
            (page_size,) = self.conn.execute("PRAGMA main.page_size").fetchone()
            (pages,) = self.conn.execute("PRAGMA main.page_count").fetchone()
            (temp_pages,) = self.conn.execute("PRAGMA temp.page_count").fetchone()
            holds = (
                f"holds {pages * page_size} bytes and its temporary tables {temp_pages * page_size}"
            )
        except (sqlite3.Error, MemoryError):  # interrupted at the deadline, say: no counts
            pass
        finally:
            self.conn.set_authorizer(self.authorizer)
        return QuotaExceeded(
            f"{self.what} {holds}: this write would take one of them past the storage "
            f"quota each may fill, {quota} bytes ({quota / (1 << 20):g} MB). Nothing of this "
            f"statement (or of its batch) was kept: {QUOTA_ADVICE}"
        )


def _code(exc: BaseException) -> int | None:
    """SQLite's primary result code of ``exc``, if it is SQLite's error."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


class _Budget:
    """What one call may still return; ``fetch`` charges every row against it as it comes."""

    def __init__(self, limits: SqlLimits) -> None:
        self._limits = limits
        self._bytes = limits.max_result_bytes
        self._values = limits.max_result_values

    def fetch(self, cursor: sqlite3.Cursor, as_dicts: bool, most: int | None = None) -> list[Any]:
        """The rest of ``cursor``'s rows (its next ``most`` if given), as dicts of column
        name to value or as lists.

        Raises:
            BindingError: the rows went over the budget; ``cursor`` is closed, and nothing past
                the row that went over was fetched.
        """
        columns = [d[0] for d in cursor.description or ()]
        # A dict row carries its column names again on the wire.
        per_row = 8 + (sum(len(c) + 8 for c in columns) if as_dicts else 0)
        rows: list[Any] = []
        for row in cursor:  # one row at a time: never more in memory than the budget allows
            self._values -= len(row) + 1
            self._bytes -= per_row + sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)
            if self._values < 0 or self._bytes < 0:
                cursor.close()
                raise BindingError(self._too_large())
            rows.append(dict(zip(columns, row, strict=True)) if as_dicts else list(row))
            if len(rows) == most:  # before the cursor steps to a row not asked for
                break
        return rows

    def _too_large(self) -> str:
        limits = self._limits
        over = (
            f"{limits.max_result_values} values (rows times columns, plus one per row)"
            if self._values < 0
            else f"{limits.max_result_bytes} bytes"
        )
        return (
            f"SQL result too large: more than {over} in one call; add LIMIT to the query, or "
            "page through it with LIMIT and OFFSET (or WHERE on the last key seen)"
        )


def _meta(cursor: sqlite3.Cursor, started: float) -> dict[str, Any]:
    wrote = cursor.description is None  # a SELECT has columns; its rowcount/lastrowid are stale
    return {
        "changes": max(cursor.rowcount, 0) if wrote else 0,
        "last_row_id": cursor.lastrowid if wrote else None,
        "duration": (time.perf_counter() - started) * 1000,
    }


class Statement(RpcTarget):
    """A prepared statement; ``bind`` returns a new statement with parameters."""

    def __init__(self, db: _Db, grants: Grants, sql: str, params: tuple[object, ...] = ()):
        db.hold(self, len(sql) + sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in params))
        self._db = db
        self._grants = grants
        self._sql = sql
        self._params = params

    def bind(self, *params: object) -> Statement:
        """This statement with ``params`` bound to its ``?`` placeholders.

        Raises:
            BindingError: a parameter is not None, int, float, str or bytes, or is an int
                outside the signed 64-bit range SQLite stores.
        """
        for value in params:
            if not isinstance(value, _PARAM_TYPES):
                raise BindingError(f"cannot bind a {type(value).__name__}; bind scalars only")
            # Refused here, not left to sqlite3's OverflowError in the middle of a batch.
            if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
                raise BindingError(
                    "cannot bind an int outside the signed 64-bit range "
                    "(-2**63 to 2**63 - 1) SQLite stores; bind it as a str"
                )
        return Statement(self._db, self._grants, self._sql, params)

    def _execute(self, conn: sqlite3.Connection) -> sqlite3.Cursor:
        return conn.execute(self._sql, self._params)

    def _result(self, conn: sqlite3.Connection, budget: _Budget) -> dict[str, Any]:
        started = time.perf_counter()
        cursor = self._execute(conn)
        rows = budget.fetch(cursor, as_dicts=True)
        return {"results": rows, "success": True, "meta": _meta(cursor, started)}

    async def all(self) -> dict[str, Any]:
        """``{"results": [row dicts], "success": True, "meta": {...}}``.

        Raises:
            BindingError: also when the rows pass ``SqlLimits.max_result_bytes`` or
                ``max_result_values`` (page with LIMIT and OFFSET).
        """
        return await self._db.run(
            self._grants, lambda conn: self._result(conn, _Budget(self._db.limits))
        )

    async def first(self, column: str | None = None) -> Any:
        """The first row as a dict (or its ``column``), None if there is none. Only that row is
        fetched, within the result budget (BindingError past it)."""

        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            cursor = self._execute(conn)
            rows = _Budget(self._db.limits).fetch(cursor, as_dicts=True, most=1)
            cursor.close()
            return rows[0] if rows else None

        row = await self._db.run(self._grants, work)
        if row is None:
            return None
        if column is None:
            return row
        if column not in row:
            raise BindingError(f"no column {column!r} in the result")
        return row[column]

    async def run(self) -> dict[str, Any]:
        """Execute for its effect: ``{"success": True, "meta": {"changes", "last_row_id"}}``."""

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            started = time.perf_counter()
            cursor = self._execute(conn)
            for _ in cursor:  # run to the end, keeping no row
                pass
            return {"success": True, "meta": _meta(cursor, started)}

        return await self._db.run(self._grants, work)

    async def raw(self) -> list[list[Any]]:
        """Rows as lists, in column order. Raises ``BindingError`` past the same budget as
        ``all``."""

        def work(conn: sqlite3.Connection) -> list[list[Any]]:
            return _Budget(self._db.limits).fetch(self._execute(conn), as_dicts=False)

        return await self._db.run(self._grants, work)


class SqlDatabase(RpcTarget):
    """One SQL database: ``prepare``, ``batch``, ``exec``. Get one with ``loader.sql(name)``."""

    def __init__(self, db: _Db, grants: Grants) -> None:
        self._db = db
        self._grants = grants

    @classmethod
    def open(
        cls,
        path: Path,
        grants: Grants,
        deadline_s: float = 5.0,
        limits: SqlLimits = _DEFAULT_LIMITS,
        quota_bytes: int | None = None,
    ) -> SqlDatabase:
        """The database at ``path`` (created if missing) with ``grants``, its file held to
        ``quota_bytes`` if given (``QuotaExceeded`` past it)."""
        return cls(_Db(path, deadline_s, limits, quota_bytes), grants)

    def with_grants(self, grants: Grants) -> SqlDatabase:
        """The same database under other grants (for another caller)."""
        return SqlDatabase(self._db, grants)

    def prepare(self, sql: str) -> Statement:
        """A statement for ``sql``; bind parameters with ``.bind(...)``."""
        if not isinstance(sql, str) or len(sql) > MAX_SQL_CHARS:
            raise BindingError(f"sql must be a string of at most {MAX_SQL_CHARS} characters")
        return Statement(self._db, self._grants, sql)

    async def batch(self, statements: Sequence[Statement]) -> list[dict[str, Any]]:
        """Run statements in one transaction: all take effect or none does. The results of all
        of them share one ``SqlLimits`` budget."""
        for statement in statements:
            if not isinstance(statement, Statement) or statement._db is not self._db:
                raise BindingError("batch() takes statements prepared on this database")

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            budget = _Budget(self._db.limits)
            control(conn, "BEGIN IMMEDIATE", self._db.authorizer)
            # Any exception from here on is rolled back by _Db.run.
            results = [statement._result(conn, budget) for statement in statements]
            control(conn, "COMMIT", self._db.authorizer)
            return results

        return await self._db.run(self._grants, work)

    async def exec(self, script: str) -> dict[str, Any]:
        """Run a script of statements separated by ``;`` (no parameters):
        ``{"count", "duration"}``. Rows a statement returns are not fetched."""
        if not isinstance(script, str) or len(script) > MAX_SQL_CHARS:
            raise BindingError(f"script must be a string of at most {MAX_SQL_CHARS} characters")

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            started = time.perf_counter()
            count = 0
            for statement in _split(script):
                conn.execute(statement).close()
                count += 1
            return {"count": count, "duration": (time.perf_counter() - started) * 1000}

        return await self._db.run(self._grants, work)


# The tokens of SQLite's own sqlite3_complete() (complete.c), in one pass: a comment is
# whitespace, and a quoted string or identifier is one token whatever ``;`` it holds. ``open``
# is a quote or comment never closed: the rest of the script is one (broken) statement.
_TOKENS: Final = re.compile(
    r"""
      (?P<semi>;)
    | (?P<space>[ \t\n\f\r]+|--[^\n]*|/\*.*?\*/)
    | (?P<word>[0-9A-Za-z_$\x80-\U0010ffff]+)
    | '[^']*' | "[^"]*" | `[^`]*` | \[[^\]]*\]
    | (?P<open>/\*|['"`\[])
    | .
    """,
    re.VERBOSE | re.DOTALL,
)
# sqlite3_complete()'s states and tokens, and its transition table, row per state.
_INVALID, _START, _NORMAL, _EXPLAIN, _CREATE, _TRIGGER, _SEMI, _END = range(8)
_TK_SEMI, _TK_WS, _TK_OTHER, _TK_EXPLAIN, _TK_CREATE, _TK_TEMP, _TK_TRIGGER, _TK_END = range(8)
_KEYWORDS: Final = {
    "explain": _TK_EXPLAIN,
    "create": _TK_CREATE,
    "temp": _TK_TEMP,
    "temporary": _TK_TEMP,
    "trigger": _TK_TRIGGER,
    "end": _TK_END,
}
_TRANSITIONS: Final = (
    # SEMI  WS  OTHER  EXPLAIN  CREATE  TEMP  TRIGGER  END
    (1, 0, 2, 3, 4, 2, 2, 2),  # INVALID
    (1, 1, 2, 3, 4, 2, 2, 2),  # START
    (1, 2, 2, 2, 2, 2, 2, 2),  # NORMAL
    (1, 3, 3, 2, 4, 2, 2, 2),  # EXPLAIN
    (1, 4, 2, 2, 2, 4, 5, 2),  # CREATE
    (6, 5, 5, 5, 5, 5, 5, 5),  # TRIGGER
    (6, 6, 5, 5, 5, 5, 5, 7),  # SEMI
    (1, 7, 5, 5, 5, 5, 5, 5),  # END
)


def _split(script: str) -> list[str]:
    """Statements of ``script``: split at each ``;`` that completes a statement as
    ``sqlite3.complete_statement`` decides (so a ``;`` in a string, quoted identifier, comment
    or trigger body does not split), with the same result as testing each ``;`` with it.

    One pass over the script, where re-testing a growing statement at each ``;`` was quadratic
    (``SELECT ';;;…'``). A statement that is only whitespace is dropped; text after the last
    split is a statement of its own, without ``;``.
    """
    statements: list[str] = []
    state, start = _INVALID, 0
    for token in _TOKENS.finditer(script):
        kind = token.lastgroup
        if kind == "open":
            break
        if kind == "semi":
            state = _TRANSITIONS[state][_TK_SEMI]
            if state == _START:
                if script[start : token.start()].strip():
                    statements.append(script[start : token.end()])
                state, start = _INVALID, token.end()
            continue
        if kind == "space":
            code = _TK_WS
        elif kind == "word":
            word = token.group()
            # SQLite folds ASCII case only: the Kelvin sign "\u212a" is no "k" to it.
            code = _KEYWORDS.get(word.lower(), _TK_OTHER) if word.isascii() else _TK_OTHER
        else:
            code = _TK_OTHER
        state = _TRANSITIONS[state][code]
    if script[start:].strip():
        statements.append(script[start:])
    return statements
