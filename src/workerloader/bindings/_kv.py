"""KV: durable key-value namespaces (Workers KV's API) on one SQLite database.

Also home of ``SqliteStore``, the one-thread runner that KV and documents (``_docs.py``) both
run their statements on: a store's statements never run on the host's event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from .._errors import BindingError, QuotaExceeded
from ..rpc import RpcTarget
from ._quota import charge, count_usage
from ._sqlite import Grants, check_grant, guarded
from ._tasks import LocksByName, holding

__all__ = ["KvNamespace", "KvStore", "SqliteStore", "page_limit", "utf8_length"]

MAX_KEY_BYTES: Final = 512
MAX_VALUE_BYTES: Final = 512 * 1024
STORE_DEADLINE_S: Final = 5.0
"""How long one call may hold a KV or document store's thread, waiting in line included (the
calling worker's wall time ends it sooner)."""

_T = TypeVar("_T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID
"""
_INDEX: Final = (
    "CREATE INDEX IF NOT EXISTS kv_expiring ON kv (namespace, expires_at) "
    "WHERE expires_at IS NOT NULL"
)
"""Each namespace's keys by expiry, for its purges (``_purge_expired``)."""
_PURGE_EVERY: Final = 64
"""Every this many puts of a store, a put also deletes up to ``_PURGE_BATCH`` of its own
namespace's expired keys: reads skip them, but kept, a worker putting keys with a short ttl
grew the database without end. (By namespace, through the index: a put that must make room
purges its namespace's too, and a scan of the namespace to find them read every value.)"""
_PURGE_BATCH: Final = 256


class SqliteStore:
    """A SQLite connection shared by every namespace of a store, and the one thread that uses it.

    ``run(work, namespace)`` runs ``work(conn)`` on that thread, one call after another: the
    host's event loop never waits on SQLite (a slow statement stalls this store's callers, not
    every tenant's requests), and the connection is never used by two threads at once. Each
    namespace has at most one call in the thread's queue at a time, its others waiting their
    turn on the event loop: a namespace that sends a burst of slow calls delays another
    namespace's call by one of them, not by the whole burst. A call that
    cannot start before its deadline is not started; one still running at it is interrupted.
    Either way it rolls back and raises BindingError. The deadline is ``STORE_DEADLINE_S`` from
    the call, or the end of the calling worker's wall time if that comes first.

    ``setup(conn)`` (a schema migration) starts on the thread at once, with no deadline;
    calls run after it, and retry it first while it has not succeeded.

    ``run(work, lookup=True)`` is for reads of one row by primary key (bounded work; in WAL
    mode a read does not wait for writers): when the connection is idle it runs at once on the
    caller's thread, saving the hop to the store's thread and back (~130 µs on a 2-vCPU VM,
    more than the lookup itself) on the hottest calls; when it is busy it waits its turn there.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        what: str,
        setup: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.conn = conn
        self.what = what
        """What the store is called in error messages ("KV store")."""
        # Its own thread rather than the loop's default executor: callers waiting their turn
        # hold a queue entry, not an executor thread other bindings need (blob file I/O).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="workerloader-store")
        self._busy = threading.Lock()  # held while anything uses the connection
        self._turns = LocksByName()  # each namespace's turn (see run)
        self._setup = setup
        if setup is not None:
            # Not on the caller's thread: a large migration would stall the event loop.
            self._thread.submit(self._set_up)

    def close(self) -> None:
        """Stop the store's thread, once what it runs is done, and close the connection.
        Blocks: from a coroutine, run it in a thread."""
        self._thread.shutdown(wait=True)
        self.conn.close()

    def _set_up(self) -> None:
        """Run ``setup`` unless it has succeeded already (on the store's thread only)."""
        with self._busy:
            if self._setup is None:
                return
            try:
                self._setup(self.conn)
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.rollback()
                raise
            self._setup = None

    async def run(
        self, work: Callable[[sqlite3.Connection], _T], namespace: str, *, lookup: bool = False
    ) -> _T:
        """``work(conn)``'s result, computed on the store's thread after ``namespace``'s calls
        before it (or at once, for an idle ``lookup``) under the call's deadline, waiting
        included. ``sqlite3.Error`` becomes BindingError; other exceptions pass through. A
        transaction ``work`` leaves open when it raises is rolled back."""
        deadline_s = STORE_DEADLINE_S
        guard = guarded(self.conn, deadline_s)  # reads the calling worker's deadline, here
        if lookup and self._setup is None and self._busy.acquire(blocking=False):
            try:
                return self._work(work, guard, deadline_s)
            finally:
                self._busy.release()

        busy = BindingError(
            f"the {self.what} is busy: the call could not start before its deadline"
        )

        def job() -> _T:
            if guard.expired():
                # A queue of calls that waited out their callers is dropped, not worked off.
                raise busy
            try:
                self._set_up()
            except sqlite3.Error as exc:
                raise BindingError(f"the {self.what} could not be upgraded: {exc}") from None
            with self._busy:
                return self._work(work, guard, deadline_s)

        turn = self._turns.of(namespace)
        loop = asyncio.get_running_loop()
        try:
            # Waited for under the call's deadline, and held until the job is done even if
            # the caller goes: the namespace's next call then queues behind it, not beside it.
            return await holding(
                turn, lambda: loop.run_in_executor(self._thread, job), guard.remaining()
            )
        except TimeoutError:
            raise busy from None

    def _work(
        self, work: Callable[[sqlite3.Connection], _T], guard: guarded, deadline_s: float
    ) -> _T:
        try:
            with guard:
                return work(self.conn)
        except BaseException as exc:
            if self.conn.in_transaction:
                self.conn.rollback()  # the next caller must not find it open
            if isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted":
                if guard.by_call:
                    raise BindingError(
                        f"the {self.what} call was interrupted: "
                        "the calling worker's wall time ran out"
                    ) from None
                raise BindingError(
                    f"the {self.what} call was interrupted after {deadline_s:g} s"
                ) from None
            if isinstance(exc, sqlite3.Error):
                raise BindingError(f"the {self.what} failed: {exc}") from None
            if isinstance(exc, MemoryError):  # SQLITE_NOMEM: the host's heap limit for SQLite
                raise BindingError(
                    f"the {self.what} ran out of the memory the host gives SQLite; try again, "
                    "or ask for less at once"
                ) from None
            raise


def utf8_length(text: str, what: str) -> int:
    """The length of ``text`` in UTF-8; BindingError naming ``what`` if it is not encodable
    (lone surrogates)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise BindingError(f"{what} is not valid Unicode text") from None


def page_limit(limit: object, most: int) -> int:
    """``limit`` if it is an int from 1 to ``most``, else BindingError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= most:
        raise BindingError(f"limit must be between 1 and {most}")
    return limit


ROW_OVERHEAD: Final = 32
"""Bytes a KV row takes beyond its namespace, key and value (SQLite's record and b-tree cell,
measured at ~29); a key with a ttl is in the expiry index too, which takes its namespace and
key again and as much more. Counted, so that a quota holds for a million tiny keys as well."""
_ROW_BYTES: Final = (
    "length(CAST(namespace AS BLOB)) + length(CAST(key AS BLOB)) + length(value) "
    f"+ {ROW_OVERHEAD} + CASE WHEN expires_at IS NULL THEN 0 ELSE "
    f"length(CAST(namespace AS BLOB)) + length(CAST(key AS BLOB)) + {ROW_OVERHEAD} END"
)
"""What a row counts toward its namespace's quota (see ``_quota``), in SQL."""


def _set_up(conn: sqlite3.Connection) -> None:
    """The migrations (on the store's thread, before its calls): the index by namespace and
    expiry in place of the one by expiry alone (``kv_by_expiry``, of databases from before
    purges were by namespace), then the usage count. Building an index on a large database
    takes a while; another process's write lock is waited for by the busy timeout."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'kv_expiring'").fetchone() is None:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DROP INDEX IF EXISTS kv_by_expiry")
            conn.execute(_INDEX)
    count_usage(conn, "kv", _ROW_BYTES)


class KvStore(SqliteStore):
    """The database behind every KV namespace of a Loader. Namespaces are separated by a
    column of the primary key, never by prefixing keys. Each namespace may keep at most
    ``quota_bytes`` of keys and values (None: no quota; see ``_quota``)."""

    def __init__(self, conn: sqlite3.Connection, quota_bytes: int | None = None) -> None:
        conn.execute(_SCHEMA)
        super().__init__(conn, "KV store", setup=_set_up)
        self.quota_bytes = quota_bytes
        self.puts = 0  # counted on the store's thread (see _PURGE_EVERY)

    def purge_now(self) -> bool:
        """Whether this put should purge expired keys (on the store's thread)."""
        self.puts += 1
        return self.puts % _PURGE_EVERY == 0


def _purge_expired(conn: sqlite3.Connection, namespace: str) -> int:
    """Delete up to ``_PURGE_BATCH`` of ``namespace``'s expired keys (found by the index on
    its expiries) and give their bytes back to its usage, inside the caller's transaction; how
    many."""
    # Sizes read first, then the rows deleted: DELETE … RETURNING evaluates the expiry test
    # in _ROW_BYTES wrongly (SQLite 3.40, with the partial index on expires_at).
    rows = conn.execute(
        f"SELECT key, {_ROW_BYTES} FROM kv WHERE namespace = ? AND expires_at <= ? LIMIT ?",
        (namespace, time.time(), _PURGE_BATCH),
    ).fetchall()
    conn.executemany(
        "DELETE FROM kv WHERE namespace = ? AND key = ?", [(namespace, key) for key, _ in rows]
    )
    charge(conn, namespace, -sum(int(size) for _, size in rows), None, "")
    return len(rows)


def _successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``, if there is one."""
    while prefix:  # a loop, not recursion: a prefix of U+10FFFFs drops them one by one
        code = ord(prefix[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates are not characters
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None


def _key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise BindingError("a KV key must be a non-empty string")
    if utf8_length(key, "a KV key") > MAX_KEY_BYTES:
        raise BindingError(f"a KV key may be at most {MAX_KEY_BYTES} bytes")
    return key


def _bound(value: object, what: str) -> str:
    """A list prefix or cursor: a string no longer than a key (longer ones match nothing)."""
    if not isinstance(value, str):
        raise BindingError(f"{what} must be a string")
    if utf8_length(value, what) > MAX_KEY_BYTES:
        raise BindingError(f"{what} may be at most {MAX_KEY_BYTES} bytes")
    return value


_TTL_MAX_S = 100 * 365 * 86400


def _expiry(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise BindingError("ttl must be a number of seconds")
    # Compared as they are: a 400-digit int is never made a float (that overflows).
    if isinstance(ttl, float) and not math.isfinite(ttl):
        raise BindingError("ttl must be a finite number of seconds")
    if ttl <= 0:
        raise BindingError("ttl must be positive")
    if ttl > _TTL_MAX_S:
        raise BindingError(f"ttl must be at most {_TTL_MAX_S} seconds")
    return time.time() + ttl


class KvNamespace(RpcTarget):
    """One KV namespace: ``get``, ``put``, ``delete``, ``list``.

    Values are str, bytes, or JSON-serialisable data (stored as JSON text). Keys expire
    ``ttl`` seconds after ``put`` when given. Every argument is checked here, at the binding's
    boundary: a bad one is BindingError, never a Python error from inside the host.
    """

    def __init__(self, store: KvStore, namespace: str, grants: Grants) -> None:
        self._store = store
        self._namespace = namespace
        self._grants = grants
        self._what = f"the KV namespace {namespace!r}"

    async def get(self, key: str, type: str = "text") -> Any:
        """The value of ``key`` as ``"text"``, ``"json"`` or ``"bytes"``; None if absent."""
        check_grant(self._grants, "read", "this KV namespace")
        if type not in ("text", "json", "bytes"):
            raise BindingError(f'type must be "text", "json" or "bytes", not {type!r}')
        params = (self._namespace, _key(key), time.time())

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM kv WHERE namespace = ? AND key = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                params,
            ).fetchone()
            return None if row is None else bytes(row[0])

        value = await self._store.run(work, self._namespace, lookup=True)
        if value is None:
            return None
        if type == "bytes":
            return value
        try:
            text = value.decode()
        except UnicodeDecodeError:
            raise BindingError(f"the value of {key!r} is not UTF-8 text; get it as bytes") from None
        if type == "text":
            return text
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise BindingError(f"the value of {key!r} is not JSON; get it as text") from None

    async def put(self, key: str, value: object, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (a positive, finite
        number) if given."""
        check_grant(self._grants, "write", "this KV namespace")
        key = _key(key)
        if isinstance(value, bytes):
            data = value
        elif isinstance(value, str):
            try:
                data = value.encode()
            except UnicodeEncodeError:
                raise BindingError("a KV value is not valid Unicode text") from None
        else:
            try:
                data = json.dumps(value).encode()  # ASCII: json escapes everything else
            except (TypeError, ValueError, RecursionError) as exc:
                raise BindingError(f"a KV value must be str, bytes or JSON data: {exc}") from None
        if len(data) > MAX_VALUE_BYTES:
            raise BindingError(f"a KV value may be at most {MAX_VALUE_BYTES} bytes")
        namespace = self._namespace
        expires = _expiry(ttl)
        params = (namespace, key, data, expires)
        names = len(namespace.encode()) + len(key.encode()) + ROW_OVERHEAD
        size = names + len(data) + (0 if expires is None else names)  # see ROW_OVERHEAD
        store = self._store

        def stored(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                f"SELECT {_ROW_BYTES} FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
            return 0 if row is None else int(row[0])

        def put(conn: sqlite3.Connection) -> None:
            with conn:
                # IMMEDIATE: a deferred transaction that reads first cannot wait for another
                # process's write (SQLITE_BUSY at once); this one waits its busy timeout.
                conn.execute("BEGIN IMMEDIATE")
                charge(conn, namespace, size - stored(conn), store.quota_bytes, self._what)
                conn.execute(
                    "INSERT INTO kv (namespace, key, value, expires_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                    "expires_at = excluded.expires_at",
                    params,
                )
                if store.purge_now():
                    _purge_expired(conn, namespace)

        def purge(conn: sqlite3.Connection) -> int:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                return _purge_expired(conn, namespace)

        def work(conn: sqlite3.Connection) -> None:
            while True:
                try:
                    return put(conn)
                except QuotaExceeded:
                    # Expired keys count until purged, and no call can name them to delete
                    # them: a namespace at its quota has its own purged (batch by batch, each
                    # kept) until the put fits or none is left, under the call's deadline.
                    if not purge(conn):
                        raise

        await self._store.run(work, self._namespace)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        check_grant(self._grants, "write", "this KV namespace")
        params = (self._namespace, _key(key))

        def work(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")  # see put
                row = conn.execute(  # not DELETE … RETURNING: see _purge_expired
                    f"SELECT {_ROW_BYTES} FROM kv WHERE namespace = ? AND key = ?", params
                ).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", params)
                    charge(conn, params[0], -int(row[0]), None, self._what)

        await self._store.run(work, self._namespace)

    async def list(
        self, prefix: str = "", limit: int = 1000, cursor: str | None = None
    ) -> dict[str, Any]:
        """Keys in order: ``{"keys": [{"name", "expiration"}], "list_complete", "cursor"}``.
        Pass the returned ``cursor`` to continue. ``prefix`` and ``cursor`` are strings of at
        most ``MAX_KEY_BYTES``; ``limit`` is 1 to 1000."""
        check_grant(self._grants, "read", "this KV namespace")
        limit = page_limit(limit, 1000)
        prefix = _bound(prefix, "prefix")
        after = "" if cursor is None else _bound(cursor, "cursor")
        # A range scan on the primary key from the prefix, bounded by its successor where one
        # exists; the substr test keeps the answer right in every case (no LIKE, no escaping).
        query = (
            "SELECT key, expires_at FROM kv WHERE namespace = ? AND key > ? AND key >= ? "
            "AND substr(key, 1, ?) = ? AND (expires_at IS NULL OR expires_at > ?)"
        )
        params: list[object] = [self._namespace, after, prefix, len(prefix), prefix, time.time()]
        upper = _successor(prefix)
        if upper is not None:
            query += " AND key < ?"
            params.append(upper)
        query += " ORDER BY key LIMIT ?"
        params.append(limit + 1)

        def work(conn: sqlite3.Connection) -> list[tuple[str, float | None]]:
            return conn.execute(query, params).fetchall()

        rows = await self._store.run(work, self._namespace)
        complete = len(rows) <= limit
        rows = rows[:limit]
        return {
            "keys": [{"name": k, "expiration": e} for k, e in rows],
            "list_complete": complete,
            "cursor": None if complete else rows[-1][0],
        }
