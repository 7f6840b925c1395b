"""Documents: the collections behind ``sdk.db`` (JSON documents with full-text search)."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from typing import Any, Final

from .._errors import BindingError
from ..rpc import RpcTarget
from ._sqlite import Grants, check_grant

__all__ = ["DocumentStore", "Documents"]

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_FIELD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_DOCUMENT_BYTES: Final = 256 * 1024
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS docs (
        namespace TEXT NOT NULL,
        collection TEXT NOT NULL,
        id TEXT NOT NULL,
        body TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (namespace, collection, id)
    ) WITHOUT ROWID""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5(
        namespace UNINDEXED, collection UNINDEXED, id UNINDEXED, text
    )""",
)


class DocumentStore:
    """The database behind every namespace's documents. Namespaces and collections are
    columns of the primary key, never prefixes of ids."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        for statement in _SCHEMA:
            conn.execute(statement)


def _collection(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BindingError(f"invalid collection name {name!r} (letters, digits, _ and -)")
    return name


def _field(name: object) -> str:
    if not isinstance(name, str) or not _FIELD.fullmatch(name):
        raise BindingError(f"invalid field name {name!r}")
    return name


def _text_of(data: dict[str, Any]) -> str:
    """The searchable text of a document: its string values, nested ones included."""
    parts: list[str] = []
    stack: list[object] = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return " ".join(parts)


def _body(data: object) -> tuple[dict[str, Any], str]:
    if not isinstance(data, dict):
        raise BindingError("a document is a dict of its fields")
    fields = {k: v for k, v in data.items() if k != "id"}
    try:
        text = json.dumps(fields, allow_nan=False)  # NaN is not JSON: SQLite's json_* refuse it
    except (TypeError, ValueError) as exc:
        raise BindingError(f"a document must be JSON data: {exc}") from None
    if len(text) > MAX_DOCUMENT_BYTES:
        raise BindingError(f"a document may be at most {MAX_DOCUMENT_BYTES} bytes of JSON")
    return fields, text


_Page = list[dict[str, Any]]  # named outside the class, whose ``list`` method shadows the builtin


class Documents(RpcTarget):
    """One namespace's collections of JSON documents: ``list``, ``get``, ``create``,
    ``update``, ``delete``, ``search``. A document is a plain dict of its fields plus ``id``."""

    def __init__(self, store: DocumentStore, namespace: str, grants: Grants) -> None:
        self._store = store
        self._namespace = namespace
        self._grants = grants

    def _doc(self, doc_id: str, body: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(body)
        doc["id"] = doc_id
        return doc

    async def list(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        order_by: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> _Page:
        """Documents of ``collection`` whose fields equal ``where``'s, ordered by
        ``order_by`` (``"-field"`` descending; by id if None), at most ``limit``. ``cursor`` is
        the id of the last document of the previous page (ordering by id) or, with
        ``order_by``, the number of documents already seen."""
        check_grant(self._grants, "read", "these documents")
        if not 1 <= limit <= 1000:
            raise BindingError("limit must be between 1 and 1000")
        query = "SELECT id, body FROM docs WHERE namespace = ? AND collection = ?"
        params: list[object] = [self._namespace, _collection(collection)]
        for name, value in (where or {}).items():
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise BindingError("where values must be str, int, float, bool or None")
            query += " AND json_extract(body, ?) IS ?"
            params += ["$." + _field(name), value]
        offset = 0
        if order_by is None:
            if cursor is not None:
                query += " AND id > ?"
                params.append(cursor)
            query += " ORDER BY id"
        else:
            descending = order_by.startswith("-")
            query += f" ORDER BY json_extract(body, ?) {'DESC' if descending else 'ASC'}, id"
            params.append("$." + _field(order_by.lstrip("-")))
            offset = int(cursor) if cursor else 0
        query += " LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self._store.lock:
            rows = self._store.conn.execute(query, params).fetchall()
        return [self._doc(i, b) for i, b in rows]

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        """The document, or None."""
        check_grant(self._grants, "read", "these documents")
        with self._store.lock:
            body = self._body_of(self._store.conn, collection, str(doc_id))
        return None if body is None else self._doc(str(doc_id), body)

    async def create(self, collection: str, data: dict[str, Any]) -> dict[str, Any]:
        """Store a new document (``data["id"]`` or a new id) and return it."""
        check_grant(self._grants, "write", "these documents")
        fields, body = _body(data)
        given = data.get("id")
        doc_id = uuid.uuid4().hex if given is None or given == "" else str(given)
        now = time.time()
        with self._store.lock, self._store.conn as conn:
            try:
                conn.execute("BEGIN")
                conn.execute(
                    "INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?)",
                    (self._namespace, _collection(collection), doc_id, body, now, now),
                )
                self._index(conn, collection, doc_id, fields)
            except sqlite3.IntegrityError:
                raise BindingError(f"{collection}/{doc_id} already exists") from None
        return {**fields, "id": doc_id}

    async def update(self, collection: str, doc_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """Merge ``data`` into the document and return it; KeyError if it does not exist."""
        check_grant(self._grants, "write", "these documents")
        with self._store.lock, self._store.conn as conn:
            conn.execute("BEGIN")
            stored = self._body_of(conn, collection, str(doc_id))
            if stored is None:
                raise KeyError(f"{collection}/{doc_id}")
            fields, body = _body({**json.loads(stored), **data})
            conn.execute(
                "UPDATE docs SET body = ?, updated = ? "
                "WHERE namespace = ? AND collection = ? AND id = ?",
                (body, time.time(), self._namespace, collection, str(doc_id)),
            )
            self._index(conn, collection, str(doc_id), fields)
        return {**fields, "id": str(doc_id)}

    async def delete(self, collection: str, doc_id: str) -> bool:
        """Remove the document; True if it existed."""
        check_grant(self._grants, "write", "these documents")
        with self._store.lock, self._store.conn as conn:
            conn.execute("BEGIN")
            cursor = conn.execute(
                "DELETE FROM docs WHERE namespace = ? AND collection = ? AND id = ?",
                (self._namespace, _collection(collection), str(doc_id)),
            )
            conn.execute(
                "DELETE FROM docs_fts WHERE namespace = ? AND collection = ? AND id = ?",
                (self._namespace, collection, str(doc_id)),
            )
        return cursor.rowcount > 0

    async def search(self, collection: str, text: str, limit: int = 20) -> _Page:
        """Documents of ``collection`` matching every word of ``text``, best first."""
        check_grant(self._grants, "read", "these documents")
        words = re.findall(r"\w+", str(text))
        if not words:
            return []
        # Each word quoted: user text is never FTS5 query syntax.
        match = " ".join('"' + w.replace('"', "") + '"' for w in words)
        with self._store.lock:
            rows = self._store.conn.execute(
                "SELECT d.id, d.body FROM docs_fts f JOIN docs d "
                "ON d.namespace = f.namespace AND d.collection = f.collection AND d.id = f.id "
                "WHERE docs_fts MATCH ? AND f.namespace = ? AND f.collection = ? "
                "ORDER BY bm25(docs_fts) LIMIT ?",
                (match, self._namespace, _collection(collection), max(1, min(limit, 100))),
            ).fetchall()
        return [self._doc(i, b) for i, b in rows]

    def _body_of(self, conn: sqlite3.Connection, collection: str, doc_id: str) -> str | None:
        row = conn.execute(
            "SELECT body FROM docs WHERE namespace = ? AND collection = ? AND id = ?",
            (self._namespace, _collection(collection), doc_id),
        ).fetchone()
        return None if row is None else str(row[0])

    def _index(
        self, conn: sqlite3.Connection, collection: str, doc_id: str, fields: dict[str, Any]
    ) -> None:
        conn.execute(
            "DELETE FROM docs_fts WHERE namespace = ? AND collection = ? AND id = ?",
            (self._namespace, collection, doc_id),
        )
        conn.execute(
            "INSERT INTO docs_fts (namespace, collection, id, text) VALUES (?, ?, ?, ?)",
            (self._namespace, collection, doc_id, _text_of(fields)),
        )
