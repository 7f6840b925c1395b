"""Storage quotas: the most each namespace may keep in each of its stores.

A quota is per namespace and per store: a namespace's KV, its documents, its SQL database and
its blob bucket may each hold up to ``quota_bytes`` (``Loader(storage_quota_mb=...)``, the
service's ``[server] storage_quota_mb``). A write that would grow a store past it fails with
``QuotaExceeded`` and keeps nothing; one that does not grow it (an overwrite with less, a
delete) always goes through, so a namespace at its quota can make room (a blob put needs room
beside the object it replaces until its commit: there, delete first).

What counts, per store:

- KV: each key's row: its namespace, key and value, and ``ROW_OVERHEAD``, twice the names for a
  key with an expiry (expired keys too, until they are purged: a put refused at the quota
  purges its namespace's and tries again);
- documents: each document's row: its JSON (``1 + INDEX_FACTOR`` times: its full-text index
  too), namespace, collection and id, and ``ROW_OVERHEAD``;
- SQL: the database file's pages, and its temporary tables' (``PRAGMA max_page_count``, kept
  by SQLite itself; its WAL and sort files are not counted);
- blobs: every file in the bucket's directory, data and heads, each rounded up to whole
  ``BLOCK`` s (a file takes at least one on disk: a million empty objects are not free).

KV and documents keep their counts in a ``usage`` table of their database, updated in the
transaction of each write (so every process that opens the database agrees); a database made
before it existed, or counted by another rule (``usage_counted_by``), is counted again as it is
opened. Blob buckets are counted by a scan of their directory the first time a process writes
to one or deletes from it, then kept in memory (``BucketUsage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Final

from .._errors import QuotaExceeded
from ._tasks import LocksByName

__all__ = [
    "BLOCK",
    "QUOTA_ADVICE",
    "BucketUsage",
    "charge",
    "count_usage",
    "on_disk",
    "quota_error",
]

_USAGE_TABLE: Final = (
    "CREATE TABLE usage (namespace TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID"
)


QUOTA_ADVICE: Final = (
    "delete what is no longer needed, or ask the operator to raise the quota "
    "(Loader(storage_quota_mb=...); [server] storage_quota_mb in the service's config)"
)
"""What to do about a full store, said by every QuotaExceeded."""


def quota_error(what: str, used: int, adding: int, quota: int) -> QuotaExceeded:
    """The error for a write of ``adding`` bytes to ``what`` (a namespace's store), which
    holds ``used`` bytes under a quota of ``quota``."""
    return QuotaExceeded(
        f"{what} holds {used} bytes: this write of {adding} more bytes would take it past its "
        f"storage quota of {quota} bytes ({quota / (1 << 20):g} MB). Nothing of the write was "
        f"kept: {QUOTA_ADVICE}"
    )


def count_usage(conn: sqlite3.Connection, table: str, size: str) -> None:
    """Count each namespace's bytes in ``table`` (``size``: an SQL expression of one row)
    into the ``usage`` table, unless it holds a count by that same expression already: a
    database from before quotas is counted once, and one counted by an earlier expression
    again (its deletes would give back what the new one counts). One transaction: a crash
    leaves the old count, and the next open counts again. Run before the store's calls."""
    if _counted_by(conn) == size:
        return
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        if _counted_by(conn) == size:  # another process counted meanwhile
            return
        conn.execute("DROP TABLE IF EXISTS usage")
        conn.execute(_USAGE_TABLE)
        conn.execute(
            f"INSERT INTO usage SELECT namespace, SUM({size}) FROM {table} GROUP BY namespace"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS usage_counted_by (expression TEXT NOT NULL)")
        conn.execute("DELETE FROM usage_counted_by")
        conn.execute("INSERT INTO usage_counted_by VALUES (?)", (size,))


def _counted_by(conn: sqlite3.Connection) -> str | None:
    """The expression the ``usage`` table was counted by, or None (no count, or an unknown
    one)."""
    tables = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name IN ('usage', 'usage_counted_by')"
        )
    }
    if tables != {"usage", "usage_counted_by"}:
        return None
    row = conn.execute("SELECT expression FROM usage_counted_by").fetchone()
    return None if row is None else str(row[0])


def charge(
    conn: sqlite3.Connection, namespace: str, delta: int, quota: int | None, what: str
) -> None:
    """Add ``delta`` bytes to ``namespace``'s usage, inside the caller's transaction.
    QuotaExceeded (and nothing added) if ``delta`` grows the usage past ``quota``; a write
    that does not grow it never fails here."""
    if delta == 0:
        return
    if delta > 0 and quota is not None:
        row = conn.execute("SELECT bytes FROM usage WHERE namespace = ?", (namespace,)).fetchone()
        used = 0 if row is None else int(row[0])
        if used + delta > quota:
            raise quota_error(what, used, delta, quota)
    conn.execute(
        "INSERT INTO usage VALUES (?, ?) "
        "ON CONFLICT (namespace) DO UPDATE SET bytes = bytes + excluded.bytes",
        (namespace, delta),
    )


BLOCK: Final = 4096
"""The unit a blob bucket's files are counted in: the block size of common file systems."""


def on_disk(size: int) -> int:
    """What a file of ``size`` bytes counts: whole ``BLOCK`` s, at least one."""
    return max(1, -(-size // BLOCK)) * BLOCK


def _bytes_under(root: Path) -> int:
    """What the files directly in ``root`` count (0 if it does not exist)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):  # removed since it was listed
                if entry.is_file(follow_symlinks=False):
                    total += on_disk(entry.stat(follow_symlinks=False).st_size)
    return total


class BucketUsage:
    """The bytes one blob bucket's files take, shared by every ``BlobBucket`` on it in this
    process. Counted by a scan on first use; from then on each put reserves its bytes as they
    arrive (so puts in flight together cannot pass the quota) and each removal gives its
    bytes back. Another process writing the same bucket is not seen until the next scan (a
    restart)."""

    def __init__(self, root: Path, quota: int | None, what: str) -> None:
        self.root = root
        self.quota = quota
        self.what = what
        self._used: int | None = None
        self._counting = asyncio.Lock()
        self.listing = asyncio.Lock()
        """Held by a ``list`` of the bucket while it reads the heads (see ``BlobBucket.list``)."""
        self.key_locks = LocksByName()
        """What a commit or delete of a key holds while it reads, replaces and removes the
        key's files: without it, a delete racing a put gave the old files' count back twice,
        and two puts of one key left a data file no head names."""

    async def used(self) -> int:
        """The bucket's bytes, counted on the first call."""
        if self._used is None:
            async with self._counting:
                if self._used is None:
                    self._used = await asyncio.to_thread(_bytes_under, self.root)
        return self._used

    async def reserve(self, size: int) -> None:
        """Count ``size`` more bytes, or raise QuotaExceeded (counting nothing) past the
        quota."""
        used = await self.used()
        if self.quota is not None and size > 0 and used + size > self.quota:
            raise quota_error(self.what, used, size, self.quota)
        self._used = used + size

    def release(self, size: int) -> None:
        """Count ``size`` fewer bytes (files removed, or a reservation not used)."""
        if self._used is not None:
            self._used -= size
