"""SQL: a D1-like database per name (``prepare(sql).bind(...).all()``, ``batch``, ``exec``).

Statements come from workers, so each database runs under an authorizer (no ATTACH, no extension
loading, no PRAGMA beyond read-only introspection), parameters are always bound, and a statement
still running at its deadline is interrupted. Statements run in a thread, one at a time per
database, so a slow query never stalls the host's event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from .._errors import BindingError, PermissionDenied
from ..rpc import RpcTarget
from ._sqlite import Authorizer, Grants, check_grant, control, guarded, open_database

__all__ = ["SqlDatabase", "Statement"]

MAX_SQL_CHARS: Final = 100_000
_PARAM_TYPES: Final = (type(None), int, float, str, bytes)
_T = TypeVar("_T")


class _Db:
    def __init__(self, path: Path, deadline_s: float) -> None:
        self.authorizer = Authorizer()
        self.conn = open_database(path, self.authorizer)
        self.lock = threading.Lock()
        self.deadline_s = deadline_s

    async def run(self, grants: Grants, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in a thread, alone on this database, under the caller's grants."""
        check_grant(grants, "read", "this database")

        guard = guarded(self.conn, self.deadline_s)  # reads the calling worker's deadline

        def locked() -> _T:
            with self.lock, guard:
                self.authorizer.allow_write = "write" in grants
                self.authorizer.refused_write = False
                try:
                    return work(self.conn)
                except sqlite3.Error as exc:
                    if self.conn.in_transaction:
                        control(self.conn, "ROLLBACK", self.authorizer)
                    if self.authorizer.refused_write:
                        raise PermissionDenied("this binding may not write this database") from None
                    if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
                        if guard.by_call:
                            raise BindingError(
                                "SQL statement interrupted: the calling worker's wall time ran out"
                            ) from None
                        raise BindingError(
                            f"SQL statement interrupted after {self.deadline_s:g} s"
                        ) from None
                    raise BindingError(str(exc)) from None

        return await asyncio.to_thread(locked)


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
        self._db = db
        self._grants = grants
        self._sql = sql
        self._params = params

    def bind(self, *params: object) -> Statement:
        """This statement with ``params`` bound to its ``?`` placeholders."""
        for value in params:
            if not isinstance(value, _PARAM_TYPES):
                raise BindingError(f"cannot bind a {type(value).__name__}; bind scalars only")
        return Statement(self._db, self._grants, self._sql, params)

    def _execute(self, conn: sqlite3.Connection) -> sqlite3.Cursor:
        return conn.execute(self._sql, self._params)

    async def all(self) -> dict[str, Any]:
        """``{"results": [row dicts], "success": True, "meta": {...}}``."""

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            started = time.perf_counter()
            cursor = self._execute(conn)
            columns = [d[0] for d in cursor.description or ()]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
            return {"results": rows, "success": True, "meta": _meta(cursor, started)}

        return await self._db.run(self._grants, work)

    async def first(self, column: str | None = None) -> Any:
        """The first row as a dict (or its ``column``), None if there is none."""
        result = await self.all()
        if not result["results"]:
            return None
        row = result["results"][0]
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
            cursor.fetchall()
            return {"success": True, "meta": _meta(cursor, started)}

        return await self._db.run(self._grants, work)

    async def raw(self) -> list[list[Any]]:
        """Rows as lists, in column order."""

        def work(conn: sqlite3.Connection) -> list[list[Any]]:
            return [list(row) for row in self._execute(conn).fetchall()]

        return await self._db.run(self._grants, work)


class SqlDatabase(RpcTarget):
    """One SQL database: ``prepare``, ``batch``, ``exec``. Get one with ``loader.sql(name)``."""

    def __init__(self, db: _Db, grants: Grants) -> None:
        self._db = db
        self._grants = grants

    @classmethod
    def open(cls, path: Path, grants: Grants, deadline_s: float = 5.0) -> SqlDatabase:
        """The database at ``path`` (created if missing) with ``grants``."""
        return cls(_Db(path, deadline_s), grants)

    def with_grants(self, grants: Grants) -> SqlDatabase:
        """The same database under other grants (for another caller)."""
        return SqlDatabase(self._db, grants)

    def prepare(self, sql: str) -> Statement:
        """A statement for ``sql``; bind parameters with ``.bind(...)``."""
        if not isinstance(sql, str) or len(sql) > MAX_SQL_CHARS:
            raise BindingError(f"sql must be a string of at most {MAX_SQL_CHARS} characters")
        return Statement(self._db, self._grants, sql)

    async def batch(self, statements: Sequence[Statement]) -> list[dict[str, Any]]:
        """Run statements in one transaction: all take effect or none does."""
        for statement in statements:
            if not isinstance(statement, Statement) or statement._db is not self._db:
                raise BindingError("batch() takes statements prepared on this database")

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            results = []
            control(conn, "BEGIN IMMEDIATE", self._db.authorizer)
            for statement in statements:
                started = time.perf_counter()
                cursor = statement._execute(conn)
                columns = [d[0] for d in cursor.description or ()]
                rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
                results.append({"results": rows, "success": True, "meta": _meta(cursor, started)})
            control(conn, "COMMIT", self._db.authorizer)
            return results

        return await self._db.run(self._grants, work)

    async def exec(self, script: str) -> dict[str, Any]:
        """Run a script of statements separated by ``;`` (no parameters):
        ``{"count", "duration"}``."""
        if not isinstance(script, str) or len(script) > MAX_SQL_CHARS:
            raise BindingError(f"script must be a string of at most {MAX_SQL_CHARS} characters")

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            started = time.perf_counter()
            count = 0
            for statement in _split(script):
                conn.execute(statement)
                count += 1
            return {"count": count, "duration": (time.perf_counter() - started) * 1000}

        return await self._db.run(self._grants, work)


def _split(script: str) -> list[str]:
    """Statements of ``script``: split on ``;`` where SQLite says a statement is complete (so a
    ``;`` inside a string or comment does not split)."""
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
