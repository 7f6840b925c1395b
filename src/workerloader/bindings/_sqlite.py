"""Opening SQLite the way every binding needs it: WAL, a busy timeout, and an authorizer that
keeps statements inside their own database."""

from __future__ import annotations

import contextvars
import sqlite3
import time
from pathlib import Path
from typing import Final

__all__ = [
    "HEAP_LIMIT_BYTES",
    "Authorizer",
    "Grants",
    "call_deadline",
    "check_grant",
    "control",
    "guarded",
    "open_database",
]

call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "workerloader_call_deadline", default=None
)
"""``time.monotonic()`` at which the worker call that made this binding call runs out of wall
time (set by the Loader for each binding call): a statement never outlives its call."""

# Introspection pragmas whose argument names a table or index (``PRAGMA table_info(t)``).
_PRAGMAS_ON: Final = frozenset(
    {
        "table_info",
        "table_xinfo",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "table_list",
    }
)
# Pragmas that may be read but never set from a worker (``PRAGMA foreign_keys = OFF`` would
# change the connection every caller shares).
_PRAGMAS_READ: Final = frozenset({"foreign_keys", "user_version", "data_version"})

_WRITES: Final = frozenset(
    {
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_REINDEX,
        sqlite3.SQLITE_ANALYZE,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_VTABLE,
        *range(sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_CREATE_VIEW + 1),
        *range(sqlite3.SQLITE_DROP_INDEX, sqlite3.SQLITE_DROP_VIEW + 1),
    }
)


class Authorizer:
    """SQLite's authorizer callback for worker-written SQL: stays in its own database, and
    writes only while ``allow_write``. ``refused_write`` tells why a statement was refused."""

    def __init__(self) -> None:
        self.allow_write = True
        self.refused_write = False

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, _: object
    ) -> int:
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in _PRAGMAS_ON or (name in _PRAGMAS_READ and arg2 is None):
                return sqlite3.SQLITE_OK
            return sqlite3.SQLITE_DENY
        if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
            # The host runs each statement (or batch) as its own transaction on a shared
            # connection; a caller's BEGIN or COMMIT would capture or cut other callers' work.
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() == "load_extension":
            return sqlite3.SQLITE_DENY
        if action in _WRITES and not self.allow_write and (arg1 or "") != "sqlite_temp_master":
            self.refused_write = True
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK


HEAP_LIMIT_BYTES = 1 << 30
"""All the memory SQLite may take in this process, every database together (``PRAGMA
hard_heap_limit``, process-wide, set by each ``open_database``): past it an allocation fails,
and the statement with it, instead of the host. Each value is capped (8 MiB for SQL), but a
worker's row can hold 2,000 of them: 16 GB."""


JOURNAL_LIMIT_BYTES = 4 << 20
"""What a database's WAL file keeps of its size after a checkpoint."""


def open_database(
    path: Path, authorizer: Authorizer | None = None, max_bytes: int | None = None
) -> sqlite3.Connection:
    """A connection in WAL mode; with ``authorizer`` for databases whose statements come from
    workers (no ATTACH, no extension loading, no PRAGMA but read-only introspection, no
    transaction control). With ``max_bytes``, SQLite refuses to grow the database file past
    it (``SQLITE_FULL``), and the connection's temporary tables likewise (they live in a file
    of the host's, outside the data dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # SQLite consults the authorizer only when it prepares a statement, so statements from
    # workers are never cached: a cached INSERT would skip the write check of the next caller.
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        cached_statements=0 if authorizer is not None else 128,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA hard_heap_limit={HEAP_LIMIT_BYTES}")
    # A large transaction grows the WAL file; a checkpoint then cuts it back to this, where
    # it would otherwise keep its largest size for good (outside any quota).
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT_BYTES}")
    if max_bytes is not None:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        pages = max(1, max_bytes // page_size)
        conn.execute(f"PRAGMA main.max_page_count={pages}")
        conn.execute(f"PRAGMA temp.max_page_count={pages}")
    if authorizer is not None:
        conn.set_authorizer(authorizer)
    return conn


def control(conn: sqlite3.Connection, sql: str, authorizer: Authorizer | None) -> None:
    """Run the host's own transaction control (BEGIN, COMMIT, ROLLBACK), which the authorizer
    refuses to workers."""
    conn.set_authorizer(None)
    try:
        conn.execute(sql)
    finally:
        conn.set_authorizer(authorizer)


class guarded:
    """Interrupt any statement still running ``deadline_s`` seconds from now, or when the
    worker call that made it runs out of wall time, whichever comes first."""

    def __init__(self, conn: sqlite3.Connection, deadline_s: float) -> None:
        self._conn = conn
        self._deadline = time.monotonic() + deadline_s
        call_ends = call_deadline.get()
        self.by_call = call_ends is not None and call_ends < self._deadline
        """True if the calling worker's deadline comes first."""
        if call_ends is not None:
            self._deadline = min(self._deadline, call_ends)

    def expired(self) -> bool:
        """Whether the deadline has passed (a call that waited its turn that long)."""
        return time.monotonic() > self._deadline

    def remaining(self) -> float:
        """Seconds left until the deadline (0 once it has passed)."""
        return max(0.0, self._deadline - time.monotonic())

    def __enter__(self) -> None:
        deadline = self._deadline
        self._conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)

    def __exit__(self, *exc: object) -> None:
        self._conn.set_progress_handler(None, 0)


Grants = frozenset[str]
"""What a binding instance may do: a subset of {"read", "write"}."""


def check_grant(grants: Grants, needed: str, store: str) -> None:
    """Raise PermissionDenied unless ``needed`` is granted."""
    if needed not in grants:
        from .._errors import PermissionDenied

        raise PermissionDenied(f"this binding may not {needed} {store}")
