"""The service's own records: API keys (stored hashed) and request logs, in SQLite."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import random
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bindings._sqlite import open_database
from ..loader._loader import valid_namespace

__all__ = ["ApiKey", "Caller", "ServiceStore"]

_PRUNE_EVERY_S = 60.0
"""How often request logs older than the retention are deleted (and once at the first flush,
which the service's periodic flush makes right after it starts)."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        namespace TEXT NOT NULL,
        permissions TEXT NOT NULL,
        created REAL NOT NULL,
        revoked REAL
    )""",
    """CREATE TABLE IF NOT EXISTS request_logs (
        id TEXT PRIMARY KEY,
        time REAL NOT NULL,
        user_id TEXT,
        namespace TEXT NOT NULL,
        worker TEXT,
        kind TEXT NOT NULL,
        status INTEGER NOT NULL,
        duration_ms REAL NOT NULL,
        error_type TEXT,
        logs TEXT NOT NULL,
        cpu_ms REAL
    )""",
    "CREATE INDEX IF NOT EXISTS request_logs_by_time ON request_logs (namespace, time)",
    # Pruning by age alone: without it, each pruning scanned the whole table on the event loop.
    "CREATE INDEX IF NOT EXISTS request_logs_by_age ON request_logs (time)",
    """CREATE TABLE IF NOT EXISTS workers (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        definition TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (namespace, id)
    ) WITHOUT ROWID""",
)
_LOG_LINES_KEPT = 100
_PENDING_LOGS_MAX = 1_000
"""Request records held in memory while they cannot be written (at most ~64 MiB of their
output); the oldest go past it."""
_RETRY_S = 2.0
"""How often records that could not be written are tried again."""
_PRUNE_BATCH = 500
"""Most records one flush deletes for the size cap: about twice what a flush writes at the
service's fastest (``_FLUSH_AT``), so the log shrinks back under the cap while it is written
to."""
_FLUSH_AT = 256
"""Records held that make ``log`` schedule a flush before the service's next (0.2 s)."""
_ROWS_PER_INSERT = 64
"""Most request records one INSERT statement writes: 704 parameters, under the 999 that
SQLite builds before 3.32 allow (32,766 since)."""
_logger = logging.getLogger("workerloader.server")


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the host binds it (never as the request claims it)."""

    user_id: str | None
    namespace: str
    authenticated: bool
    permissions: tuple[str, ...] = ("read", "write")


@dataclass(frozen=True)
class ApiKey:
    """A key's record (the key itself is shown once, at creation, and stored only hashed)."""

    id: str
    user_id: str
    namespace: str
    permissions: tuple[str, ...]
    created: float
    revoked: float | None = None
    secret: str | None = field(default=None, repr=False)


_id_bits = random.getrandbits
"""The random half of a request record's id (``log``): 32 hex digits, the first 16 the time
in nanoseconds, the rest random. Ids that grow with time are appended to the id index, where
random ones (uuid4) landed all over it: writing a record cost half as much (11 against 23 µs,
60,000 records into a log of 20,000). They need to be unique, not secret: a generator seeded
from the OS (again in a forked child), not a system call per record."""


def _rows_per_insert(left: int) -> int:
    """How many of ``left`` records to write with the next INSERT: ``_ROWS_PER_INSERT``, or
    the largest power of two below it, so that a few statements serve every batch (SQLite
    keeps the last 128 it prepared)."""
    return _ROWS_PER_INSERT if left >= _ROWS_PER_INSERT else 1 << (left.bit_length() - 1)


@functools.cache
def _insert_rows(count: int) -> str:
    """The INSERT of ``count`` request records."""
    row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    return (
        "INSERT INTO request_logs (id, time, user_id, namespace, worker, kind, status, "
        "duration_ms, cpu_ms, error_type, logs) VALUES " + ", ".join([row] * count)
    )


def _hash(secret: str) -> str:
    # Keys are 32 random bytes: a plain SHA-256 is enough (nothing to brute-force).
    return hashlib.sha256(secret.encode()).hexdigest()


class ServiceStore:
    """API keys and request logs under the data dir (``service.sqlite3``)."""

    def __init__(
        self, data_dir: Path, retention_s: float = 7 * 86400, max_bytes: int = 1 << 30
    ) -> None:
        """``retention_s``: request records older are deleted. ``max_bytes``: past this size
        of the database, the oldest records go too (any caller can make records,
        up to 64 KiB of output each, as fast as the service answers)."""
        self._conn: sqlite3.Connection = open_database(data_dir / "service.sqlite3")
        self._lock = threading.Lock()
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._prune_at = 0.0  # monotonic time of the next pruning: the first flush prunes
        # What requests ask on every call, kept until SQLite's data_version says another
        # connection (the CLI) wrote, or this one writes it: a warm fetch then costs a pragma.
        self._seen_version = -1
        self._has_keys: bool | None = None  # None: to be read
        self._workers: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._pending_logs: list[tuple[object, ...]] = []
        self._log_write_failing = False  # warned once; cleared by the next good write
        self._retry_at = 0.0  # while writes fail: when the periodic flush tries again
        self._flush_soon = False  # a flush is scheduled on the event loop
        self._dropped = False  # warned that held records were dropped
        for statement in _SCHEMA:
            self._conn.execute(statement)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(request_logs)")}
        if "cpu_ms" not in columns:  # a data dir from before request logs had it: kept as is
            self._conn.execute("ALTER TABLE request_logs ADD COLUMN cpu_ms REAL")

    # -- keys ----------------------------------------------------------------------------

    def create_key(
        self, user_id: str, namespace: str, permissions: tuple[str, ...] = ("read", "write")
    ) -> ApiKey:
        """A new key; its ``secret`` is returned this once. ValueError for a namespace the
        bindings cannot scope to (letters, digits, ``_ . -``; a key made with one could call
        nothing that uses them)."""
        valid_namespace(namespace)
        secret = "wl_" + secrets.token_urlsafe(32)
        key = ApiKey(
            uuid.uuid4().hex[:12], user_id, namespace, permissions, time.time(), None, secret
        )
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (key.id, _hash(secret), user_id, namespace, json.dumps(permissions), key.created),
            )
            self._has_keys = None  # re-read after the write
        return key

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, user_id, namespace, permissions, created, revoked FROM api_keys "
                "ORDER BY created"
            ).fetchall()
        return [ApiKey(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time(), key_id),
            )
            self._has_keys = None  # re-read after the write
        return cursor.rowcount > 0

    def has_keys(self) -> bool:
        """True once any key has been created, revoked ones too: then every request must
        present an active one (revoking the last key must not open the service to anonymous
        callers). Re-read only when another connection (the CLI creating a key) has written
        the database, which SQLite's data_version tells for the price of a pragma."""
        with self._lock:
            self._forget_if_written_elsewhere()
            if self._has_keys is None:
                row = self._conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone()
                self._has_keys = row is not None
            return self._has_keys

    def _forget_if_written_elsewhere(self) -> None:
        """Drop the cached answers if another connection has written (hold the lock)."""
        (version,) = self._conn.execute("PRAGMA data_version").fetchone()
        if version != self._seen_version:
            self._seen_version = version
            self._has_keys = None
            self._workers.clear()

    def caller_for(self, secret: str) -> Caller | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT user_id, namespace, permissions FROM api_keys "
                "WHERE hash = ? AND revoked IS NULL",
                (_hash(secret),),
            ).fetchone()
        if row is None:
            return None
        return Caller(row[0], row[1], True, tuple(json.loads(row[2])))

    # -- workers --------------------------------------------------------------------------

    def put_worker(self, namespace: str, worker_id: str, definition: dict[str, Any]) -> int:
        """Store a worker's definition; returns its new version."""
        with self._lock:
            self._workers.clear()
            row = self._conn.execute(
                "SELECT version FROM workers WHERE namespace = ? AND id = ?",
                (namespace, worker_id),
            ).fetchone()
            version = 1 if row is None else row[0] + 1
            self._conn.execute(
                "INSERT INTO workers VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, id) DO "
                "UPDATE SET definition = excluded.definition, version = excluded.version, "
                "updated = excluded.updated",
                (namespace, worker_id, json.dumps(definition), version, time.time()),
            )
        return version

    def get_worker(self, namespace: str, worker_id: str) -> dict[str, Any] | None:
        """A stored worker's definition with ``id``, ``version`` and ``updated``, or None.
        The dict may be shared between callers: read it, do not change it."""
        key = (namespace, worker_id)
        with self._lock:
            self._forget_if_written_elsewhere()
            if key in self._workers:
                return self._workers[key]
            row = self._conn.execute(
                "SELECT definition, version, updated FROM workers WHERE namespace = ? AND id = ?",
                key,
            ).fetchone()
            stored = None
            if row is not None:
                stored = {"id": worker_id, "version": row[1], "updated": row[2]}
                stored.update(json.loads(row[0]))
            if len(self._workers) >= 10_000:
                self._workers.clear()
            self._workers[key] = stored
            return stored

    def list_workers(self, namespace: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, version, updated FROM workers WHERE namespace = ? ORDER BY id",
                (namespace,),
            ).fetchall()
        return [{"id": r[0], "version": r[1], "updated": r[2]} for r in rows]

    def delete_worker(self, namespace: str, worker_id: str) -> bool:
        with self._lock:
            self._workers.clear()
            cursor = self._conn.execute(
                "DELETE FROM workers WHERE namespace = ? AND id = ?", (namespace, worker_id)
            )
        return cursor.rowcount > 0

    # -- request logs --------------------------------------------------------------------

    def log(
        self,
        caller: Caller,
        kind: str,
        status: int,
        duration_ms: float,
        *,
        cpu_ms: float | None = None,
        worker: str | None = None,
        error_type: str | None = None,
        logs: list[str] | None = None,
    ) -> None:
        """Record one execute/fetch/rpc call, its output truncated to ``_LOG_LINES_KEPT``
        lines. Records are written in batches (``flush``), never on the way to an answer:
        the service flushes every 0.2 s, and once ``_FLUSH_AT`` records are held, as soon as
        the event loop is free (at once when called outside an event loop)."""
        now_ns = time.time_ns()
        row = (
            f"{now_ns:016x}{_id_bits(64):016x}",
            now_ns / 1e9,
            caller.user_id,
            caller.namespace,
            worker,
            kind,
            status,
            round(duration_ms, 3),
            None if cpu_ms is None else round(cpu_ms, 3),
            error_type,
            json.dumps(logs[:_LOG_LINES_KEPT]) if logs else "[]",
        )
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            pending = self._pending_logs
            pending.append(row)
            if len(pending) > _PENDING_LOGS_MAX:  # writes failing (or no flush for long)
                del pending[0]
                if not self._log_write_failing and not self._dropped:
                    self._dropped = True
                    _logger.warning("request log records dropped: none was written for long")
            if len(pending) < _FLUSH_AT or self._log_write_failing:
                return
            if loop is None:  # no event loop here to be kept free
                self._flush_logs()
                return
            if self._flush_soon:
                return
            self._flush_soon = True
        loop.call_soon(self.flush)

    def flush(self, *, when_due: bool = False) -> None:
        """Write the records still held in memory (``log`` batches them). ``when_due``: not
        while writes are failing and their next retry has not come (the service's periodic
        flush; a caller's own flush tries at once)."""
        with self._lock:
            if when_due and self._log_write_failing and time.monotonic() < self._retry_at:
                return
            self._flush_logs()

    def _flush_logs(self) -> None:
        """Write the pending records. Never raises: a request's answer does not depend on
        its record being written. If the database refuses them (a full disk, say), they stay
        pending, up to ``_PENDING_LOGS_MAX`` (``log`` drops the oldest past it), retried by the
        service's periodic flush every ``_RETRY_S`` (not with each request), and a warning says
        so once until a write succeeds again."""
        # One transaction for many records: a commit per request cost more than the request.
        self._flush_soon = False  # whoever flushes, a full batch may schedule the next
        now = time.monotonic()
        try:
            if now >= self._prune_at:  # by the clock, so that a quiet service prunes too
                self._prune_at = now + _PRUNE_EVERY_S
                self._conn.execute(
                    "DELETE FROM request_logs WHERE time < ?", (time.time() - self.retention_s,)
                )
            if self._pending_logs:
                self._prune_to_size()
            if not self._pending_logs:
                return
            self._conn.execute("BEGIN")
            try:
                # Many records a statement: the CPU a record 2.7-3.0 µs against 4.0 with
                # executemany, measured in batches of 256.
                pending = self._pending_logs
                start = 0
                while start < len(pending):
                    rows = pending[start : start + _rows_per_insert(len(pending) - start)]
                    start += len(rows)
                    self._conn.execute(
                        _insert_rows(len(rows)), list(itertools.chain.from_iterable(rows))
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, MemoryError) as exc:  # MemoryError: SQLite's heap limit
            self._retry_at = now + _RETRY_S  # the records stay pending (log() bounds them)
            if not self._log_write_failing:
                self._log_write_failing = True
                _logger.warning(
                    "request log records not written (%s): %d held, retried every %g s",
                    exc,
                    len(self._pending_logs),
                    _RETRY_S,
                )
            return
        self._pending_logs = []
        self._log_write_failing = self._dropped = False

    def _prune_to_size(self) -> None:
        """Delete the oldest records while the database is over ``max_bytes``, at most
        ``_PRUNE_BATCH`` a flush (a flush runs on the event loop; deleting a tenth of a large
        log at once took a quarter of a second). Their pages are reused: the file stops
        growing about there."""
        if self._size() > self.max_bytes:  # one query: cheap enough for every flush
            self._conn.execute(  # oldest by insertion order: rowid
                "DELETE FROM request_logs WHERE rowid IN "
                "(SELECT rowid FROM request_logs ORDER BY rowid LIMIT ?)",
                (_PRUNE_BATCH,),
            )

    def _size(self) -> int:
        """Bytes the database's pages in use take (the file keeps the free ones, for reuse)."""
        (size,) = self._conn.execute(
            "SELECT (page_count - freelist_count) * page_size "
            "FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
        ).fetchone()
        return int(size)

    def logs(
        self,
        namespace: str,
        *,
        worker: str | None = None,
        status: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The newest records of ``namespace`` first, filtered (times inclusive); at most
        ``limit``, held within 1..1000."""
        query = "SELECT * FROM request_logs WHERE namespace = ?"
        params: list[object] = [namespace]
        for column, value in (("worker", worker), ("status", status)):
            if value is not None:
                query += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            query += " AND time >= ?"
            params.append(since)
        if until is not None:
            query += " AND time <= ?"
            params.append(until)
        query += " ORDER BY time DESC LIMIT ?"
        params.append(max(1, min(limit, 1000)))
        with self._lock:
            self._flush_logs()
            cursor = self._conn.execute(query, params)
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        out = []
        for row in rows:
            record = dict(zip(names, row, strict=True))
            record["logs"] = json.loads(record["logs"])
            out.append(record)
        return out
