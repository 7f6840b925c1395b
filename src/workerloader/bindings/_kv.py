"""KV: durable key-value namespaces (Workers KV's API) on one SQLite database."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any, Final

from .._errors import BindingError
from ..rpc import RpcTarget
from ._sqlite import Grants, check_grant

__all__ = ["KvNamespace", "KvStore"]

MAX_KEY_BYTES: Final = 512
MAX_VALUE_BYTES: Final = 512 * 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID
"""


class KvStore:
    """The database behind every KV namespace of a Loader. Namespaces are separated by a
    column of the primary key, never by prefixing keys."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        conn.execute(_SCHEMA)


def _successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``, if there is one."""
    if not prefix:
        return None
    code = ord(prefix[-1]) + 1
    if 0xD800 <= code <= 0xDFFF:  # surrogates are not characters
        code = 0xE000
    if code > 0x10FFFF:
        return _successor(prefix[:-1])
    return prefix[:-1] + chr(code)


def _key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise BindingError("a KV key must be a non-empty string")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BindingError(f"a KV key may be at most {MAX_KEY_BYTES} bytes")
    return key


class KvNamespace(RpcTarget):
    """One KV namespace: ``get``, ``put``, ``delete``, ``list``.

    Values are str, bytes, or JSON-serialisable data (stored as JSON text). Keys expire
    ``ttl`` seconds after ``put`` when given.
    """

    def __init__(self, store: KvStore, namespace: str, grants: Grants) -> None:
        self._store = store
        self._namespace = namespace
        self._grants = grants

    async def get(self, key: str, type: str = "text") -> Any:
        """The value of ``key`` as ``"text"``, ``"json"`` or ``"bytes"``; None if absent."""
        check_grant(self._grants, "read", "this KV namespace")
        if type not in ("text", "json", "bytes"):
            raise BindingError(f'type must be "text", "json" or "bytes", not {type!r}')
        with self._store.lock:
            row = self._store.conn.execute(
                "SELECT value FROM kv WHERE namespace = ? AND key = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (self._namespace, _key(key), time.time()),
            ).fetchone()
        if row is None:
            return None
        value: bytes = row[0]
        if type == "bytes":
            return value
        text = value.decode()
        if type == "text":
            return text
        try:
            return json.loads(text)
        except ValueError:
            raise BindingError(f"the value of {key!r} is not JSON; get it as text") from None

    async def put(self, key: str, value: object, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds if given."""
        check_grant(self._grants, "write", "this KV namespace")
        if isinstance(value, bytes):
            data = value
        elif isinstance(value, str):
            data = value.encode()
        else:
            try:
                data = json.dumps(value).encode()
            except TypeError as exc:
                raise BindingError(f"a KV value must be str, bytes or JSON data: {exc}") from None
        if len(data) > MAX_VALUE_BYTES:
            raise BindingError(f"a KV value may be at most {MAX_VALUE_BYTES} bytes")
        if ttl is not None and ttl <= 0:
            raise BindingError("ttl must be positive")
        expires = None if ttl is None else time.time() + ttl
        with self._store.lock:
            self._store.conn.execute(
                "INSERT INTO kv (namespace, key, value, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                "expires_at = excluded.expires_at",
                (self._namespace, _key(key), data, expires),
            )

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        check_grant(self._grants, "write", "this KV namespace")
        with self._store.lock:
            self._store.conn.execute(
                "DELETE FROM kv WHERE namespace = ? AND key = ?", (self._namespace, _key(key))
            )

    async def list(
        self, prefix: str = "", limit: int = 1000, cursor: str | None = None
    ) -> dict[str, Any]:
        """Keys in order: ``{"keys": [{"name", "expiration"}], "list_complete", "cursor"}``.
        Pass the returned ``cursor`` to continue."""
        check_grant(self._grants, "read", "this KV namespace")
        if not 1 <= limit <= 1000:
            raise BindingError("limit must be between 1 and 1000")
        after = cursor or ""
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
        with self._store.lock:
            rows = self._store.conn.execute(query, params).fetchall()
        complete = len(rows) <= limit
        rows = rows[:limit]
        return {
            "keys": [{"name": k, "expiration": e} for k, e in rows],
            "list_complete": complete,
            "cursor": None if complete else rows[-1][0],
        }
