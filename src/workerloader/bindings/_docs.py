"""Documents: the collections behind ``sdk.db`` (JSON documents with full-text search).

Every namespace has a full-text index of its own (``fts_table``): bm25 ranks a namespace's
results by that namespace's documents alone, so neither the order nor the speed of a search
says anything about another tenant's words. Databases written before that had one index for
every namespace (``docs_fts``); opening one moves its rows to the per-namespace tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import time
import uuid
from typing import Any, Final

from .._errors import BindingError
from ..rpc import RpcTarget
from ._kv import SqliteStore, page_limit, utf8_length
from ._quota import charge, count_usage
from ._sqlite import Grants, check_grant

__all__ = ["DocumentStore", "Documents", "fts_table"]

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_FIELD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_COUNT: Final = re.compile(r"[0-9]{1,9}")

MAX_DOCUMENT_BYTES: Final = 256 * 1024
"""A document's fields as JSON (ASCII, so characters are bytes); indexing one this size takes a
few milliseconds of the store's thread."""
MAX_ID_BYTES: Final = 512
MAX_LIST_LIMIT: Final = 1000
MAX_SEARCH_LIMIT: Final = 100
MAX_WHERE_FIELDS: Final = 32
MAX_OFFSET: Final = 10_000
"""The largest ``cursor`` of a list ordered by a field: the documents it skips are still read."""
MAX_PAGE_BYTES: Final = 2 << 20
"""The documents one list or search returns, as stored JSON: half of what one RPC message
carries (4 MiB), so a page always fits, and the host never holds more for one call."""
MAX_SEARCH_BYTES: Final = 1024
MAX_SEARCH_WORDS: Final = 32

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS docs (
        namespace TEXT NOT NULL,
        collection TEXT NOT NULL,
        id TEXT NOT NULL,
        body TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (namespace, collection, id)
    ) WITHOUT ROWID""",
    # Where each document's row is in its namespace's full-text table: replacing or removing
    # it is then a lookup, where a match on the table's unindexed id column read all of it.
    """CREATE TABLE IF NOT EXISTS docs_fts_rows (
        namespace TEXT NOT NULL,
        collection TEXT NOT NULL,
        id TEXT NOT NULL,
        fts_rowid INTEGER NOT NULL,
        PRIMARY KEY (namespace, collection, id)
    ) WITHOUT ROWID""",
)
_LEGACY_FTS: Final = "docs_fts"
"""The index every namespace shared (namespace, collection, id, text) before ``fts_table``."""


def fts_table(namespace: str) -> str:
    """The name of ``namespace``'s full-text table: a hash, so any namespace name is a safe
    SQL identifier and no two namespaces share one."""
    return "docs_fts_" + hashlib.sha256(namespace.encode()).hexdigest()[:32]


def _create_fts(conn: sqlite3.Connection, table: str) -> None:
    conn.execute(
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5("
        "collection UNINDEXED, id UNINDEXED, text)"
    )


def _table_exists(conn: sqlite3.Connection, table: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return found is not None


def _index(
    conn: sqlite3.Connection, table: str, namespace: str, collection: str, doc_id: str, text: str
) -> None:
    """Put a document's text in ``table`` (its namespace's), replacing what was there."""
    _unindex(conn, table, namespace, collection, doc_id)
    rowid = conn.execute(
        f"INSERT INTO {table} (collection, id, text) VALUES (?, ?, ?)", (collection, doc_id, text)
    ).lastrowid
    conn.execute(
        "INSERT INTO docs_fts_rows VALUES (?, ?, ?, ?)", (namespace, collection, doc_id, rowid)
    )


def _unindex(
    conn: sqlite3.Connection, table: str, namespace: str, collection: str, doc_id: str
) -> None:
    key = (namespace, collection, doc_id)
    row = conn.execute(
        "SELECT fts_rowid FROM docs_fts_rows WHERE namespace = ? AND collection = ? AND id = ?",
        key,
    ).fetchone()
    if row is not None:
        conn.execute(f"DELETE FROM {table} WHERE rowid = ?", row)
        conn.execute(
            "DELETE FROM docs_fts_rows WHERE namespace = ? AND collection = ? AND id = ?", key
        )


def _move_legacy_index(conn: sqlite3.Connection) -> None:
    """Move the rows of the shared index to each namespace's own table, then drop it: one
    transaction, so a crash leaves the old index whole and the next open moves it again."""
    if not _table_exists(conn, _LEGACY_FTS):
        return
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        if not _table_exists(conn, _LEGACY_FTS):  # another process moved it while we waited
            return
        namespaces = conn.execute(f"SELECT DISTINCT namespace FROM {_LEGACY_FTS}").fetchall()
        # Every table first: no schema change while the copy below reads the old index.
        for (namespace,) in namespaces:
            _create_fts(conn, fts_table(str(namespace)))
        for namespace, collection, doc_id, text in conn.execute(
            f"SELECT namespace, collection, id, text FROM {_LEGACY_FTS}"
        ):
            table = fts_table(str(namespace))
            _index(conn, table, str(namespace), str(collection), str(doc_id), str(text))
        conn.execute(f"DROP TABLE {_LEGACY_FTS}")


ROW_OVERHEAD: Final = 64
"""Bytes a document's rows take beyond its JSON and names (its record and timestamps, its row
in the full-text table and the map to it). Counted, so that a quota holds for a million tiny
documents as well."""
INDEX_FACTOR: Final = 2
"""The full-text index of a document's text takes up to about twice the JSON again (measured:
2.7 times for text of three-letter words, less for longer ones): counted as that."""
_ROW_BYTES: Final = (
    f"(1 + {INDEX_FACTOR}) * length(body) + length(CAST(namespace AS BLOB)) "
    f"+ length(CAST(collection AS BLOB)) + length(CAST(id AS BLOB)) + {ROW_OVERHEAD}"
)
"""What a document counts toward its namespace's quota (see ``_quota``), in SQL: its JSON is
ASCII, so its length is its bytes."""


def _set_up(conn: sqlite3.Connection) -> None:
    _move_legacy_index(conn)
    count_usage(conn, "docs", _ROW_BYTES)


class DocumentStore(SqliteStore):
    """The database behind every namespace's documents. Namespaces and collections are
    columns of the primary key, never prefixes of ids; each namespace has its own full-text
    table (``fts_table``)."""

    def __init__(self, conn: sqlite3.Connection, quota_bytes: int | None = None) -> None:
        for statement in _SCHEMA:
            conn.execute(statement)
        super().__init__(conn, "document store", setup=_set_up)
        self.quota_bytes = quota_bytes
        """The most each namespace's documents may take (None: no quota; see ``_quota``)."""
        self._indexed: set[str] = set()  # namespaces whose table exists (store thread only)

    def index_for_write(self, conn: sqlite3.Connection, namespace: str) -> str:
        """``namespace``'s full-text table, made if it is not there yet. Call it outside any
        transaction: one rolled back would take the new table with it."""
        table = fts_table(namespace)
        if namespace not in self._indexed:
            _create_fts(conn, table)
            self._indexed.add(namespace)
        return table

    def index_for_read(self, conn: sqlite3.Connection, namespace: str) -> str | None:
        """``namespace``'s full-text table, or None if nothing was ever indexed there."""
        table = fts_table(namespace)
        if namespace in self._indexed:
            return table
        if not _table_exists(conn, table):
            return None  # not remembered: another process may make it
        self._indexed.add(namespace)
        return table


def _collection(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BindingError(f"invalid collection name {name!r} (letters, digits, _ and -)")
    return name


def _field(name: object) -> str:
    if not isinstance(name, str) or not _FIELD.fullmatch(name):
        raise BindingError(f"invalid field name {name!r}")
    return name


def _doc_id(doc_id: object) -> str:
    """A document id: a non-empty str (or int, taken as its decimal text) of bounded size."""
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id or utf8_length(doc_id, "an id") > MAX_ID_BYTES:
        raise BindingError(f"a document id is a non-empty string of at most {MAX_ID_BYTES} bytes")
    return doc_id


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
    except (TypeError, ValueError, RecursionError) as exc:
        raise BindingError(f"a document must be JSON data: {exc}") from None
    if len(text) > MAX_DOCUMENT_BYTES:
        raise BindingError(f"a document may be at most {MAX_DOCUMENT_BYTES} bytes of JSON")
    return fields, text


def _where_value(value: object) -> object:
    if not isinstance(value, (str, int, float, bool, type(None))):
        raise BindingError("where values must be str, int, float, bool or None")
    if isinstance(value, int) and not -(1 << 63) <= value < 1 << 63:
        raise BindingError("where ints must fit in 64 bits (as SQLite stores them)")
    if isinstance(value, float) and not math.isfinite(value):
        raise BindingError("where numbers must be finite (JSON has no NaN or infinity)")
    if isinstance(value, str):
        utf8_length(value, "a where value")
    return value


def _json_kinds(value: object) -> tuple[str, ...]:
    """The JSON types a field may have to equal ``value`` (a where value): SQLite reads JSON
    true and false as 1 and 0, and an array or object as its JSON text, so the field's type
    keeps each value to its own kind."""
    if isinstance(value, bool):
        return ("true",) if value else ("false",)
    if isinstance(value, (int, float)):
        return ("integer", "real")
    if isinstance(value, str):
        return ("text",)
    return ()


def _offset(cursor: object) -> int:
    """The cursor of a list ordered by a field: the count of documents already seen."""
    if cursor is None or cursor == "":
        return 0
    if isinstance(cursor, str) and _COUNT.fullmatch(cursor):
        cursor = int(cursor)
    if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= MAX_OFFSET:
        raise BindingError(
            f"with order_by, cursor is the count of documents already listed, 0 to {MAX_OFFSET}"
        )
    return cursor


def _doc(doc_id: str, body: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    doc["id"] = doc_id
    return doc


def _page(rows: sqlite3.Cursor) -> list[dict[str, Any]]:
    """The documents of ``rows`` (id, body), read one at a time and refused as soon as they
    pass ``MAX_PAGE_BYTES``."""
    page: list[dict[str, Any]] = []
    size = 0
    for doc_id, body in rows:
        size += len(body)
        if size > MAX_PAGE_BYTES:
            raise BindingError(
                f"these documents are over {MAX_PAGE_BYTES} bytes, more than one call returns; "
                "ask for fewer at a time (a smaller limit) and page with cursor"
            )
        page.append(_doc(doc_id, body))
    return page


_Page = list[dict[str, Any]]  # named outside the class, whose ``list`` method shadows the builtin


class Documents(RpcTarget):
    """One namespace's collections of JSON documents: ``list``, ``get``, ``create``,
    ``update``, ``delete``, ``search``. A document is a plain dict of its fields plus ``id``.

    Every argument is checked here, at the binding's boundary: a bad one (wrong type, over a
    limit above) is BindingError, never a Python error from inside the host.
    """

    def __init__(self, store: DocumentStore, namespace: str, grants: Grants) -> None:
        self._store = store
        self._namespace = namespace
        self._grants = grants
        self._what = f"the documents of namespace {namespace!r}"

    async def list(
        self,
        collection: str,
        where: dict[str, Any] | None = None,
        order_by: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> _Page:
        """Documents of ``collection`` whose fields equal ``where``'s (at most 32 fields),
        ordered by ``order_by`` (``"-field"`` descending; by id if None), at most ``limit``
        (1 to 1000). ``cursor`` is the id of the last document of the previous page (ordering
        by id) or, with ``order_by``, the number of documents already seen (at most 10000).
        A page over ``MAX_PAGE_BYTES`` of documents is BindingError: ask for fewer."""
        check_grant(self._grants, "read", "these documents")
        limit = page_limit(limit, MAX_LIST_LIMIT)
        query = "SELECT id, body FROM docs WHERE namespace = ? AND collection = ?"
        params: list[object] = [self._namespace, _collection(collection)]
        if where is None:
            where = {}
        if not isinstance(where, dict):
            raise BindingError("where is a dict of field names to values")
        if len(where) > MAX_WHERE_FIELDS:
            raise BindingError(f"where may name at most {MAX_WHERE_FIELDS} fields")
        for name, wanted in where.items():
            path, value = "$." + _field(name), _where_value(wanted)
            query += " AND json_extract(body, ?) IS ?"
            params += [path, value]
            kinds = _json_kinds(value)
            if kinds:  # None matches null and a missing field: no kind to ask for
                query += f" AND json_type(body, ?) IN ({', '.join('?' * len(kinds))})"
                params += [path, *kinds]
        offset = 0
        if order_by is None:
            if cursor is not None:
                query += " AND id > ?"
                params.append(_doc_id(cursor) if cursor != "" else "")
            query += " ORDER BY id"
        else:
            if not isinstance(order_by, str):
                raise BindingError("order_by is a field name, with a leading - for descending")
            descending = order_by.startswith("-")
            query += f" ORDER BY json_extract(body, ?) {'DESC' if descending else 'ASC'}, id"
            params.append("$." + _field(order_by[1:] if descending else order_by))
            offset = _offset(cursor)
        query += " LIMIT ? OFFSET ?"
        params += [limit, offset]
        return await self._store.run(
            lambda conn: _page(conn.execute(query, params)), self._namespace
        )

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        """The document, or None."""
        check_grant(self._grants, "read", "these documents")
        collection, doc_id = _collection(collection), _doc_id(doc_id)

        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            body = self._body_of(conn, collection, doc_id)
            return None if body is None else _doc(doc_id, body)

        return await self._store.run(work, self._namespace, lookup=True)

    async def create(self, collection: str, data: dict[str, Any]) -> dict[str, Any]:
        """Store a new document (``data["id"]`` or a new id) and return it."""
        check_grant(self._grants, "write", "these documents")
        collection = _collection(collection)
        fields, body = _body(data)
        given = data.get("id")
        doc_id = uuid.uuid4().hex if given is None or given == "" else _doc_id(given)
        now = time.time()
        names = self._namespace + collection + doc_id
        size = (1 + INDEX_FACTOR) * len(body) + len(names.encode()) + ROW_OVERHEAD

        def work(conn: sqlite3.Connection) -> None:
            index = self._store.index_for_write(conn, self._namespace)
            with conn:
                conn.execute("BEGIN IMMEDIATE")  # waits for another process's write
                try:
                    conn.execute(
                        "INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?)",
                        (self._namespace, collection, doc_id, body, now, now),
                    )
                except sqlite3.IntegrityError:
                    raise BindingError(f"{collection}/{doc_id} already exists") from None
                charge(conn, self._namespace, size, self._store.quota_bytes, self._what)
                _index(conn, index, self._namespace, collection, doc_id, _text_of(fields))

        await self._store.run(work, self._namespace)
        return {**fields, "id": doc_id}

    async def update(self, collection: str, doc_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """Merge ``data`` into the document and return it; KeyError if it does not exist."""
        check_grant(self._grants, "write", "these documents")
        collection, doc_id = _collection(collection), _doc_id(doc_id)
        if not isinstance(data, dict):
            raise BindingError("a document is a dict of its fields")

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            index = self._store.index_for_write(conn, self._namespace)
            with conn:
                conn.execute("BEGIN IMMEDIATE")  # waits for another process's write
                stored = self._body_of(conn, collection, doc_id)
                if stored is None:
                    raise KeyError(f"{collection}/{doc_id}")
                fields, body = _body({**json.loads(stored), **data})
                grows = (1 + INDEX_FACTOR) * (len(body) - len(stored))
                charge(conn, self._namespace, grows, self._store.quota_bytes, self._what)
                conn.execute(
                    "UPDATE docs SET body = ?, updated = ? "
                    "WHERE namespace = ? AND collection = ? AND id = ?",
                    (body, time.time(), self._namespace, collection, doc_id),
                )
                _index(conn, index, self._namespace, collection, doc_id, _text_of(fields))
            return {**fields, "id": doc_id}

        return await self._store.run(work, self._namespace)

    async def delete(self, collection: str, doc_id: str) -> bool:
        """Remove the document; True if it existed."""
        check_grant(self._grants, "write", "these documents")
        collection, doc_id = _collection(collection), _doc_id(doc_id)

        def work(conn: sqlite3.Connection) -> bool:
            index = self._store.index_for_read(conn, self._namespace)
            with conn:
                conn.execute("BEGIN IMMEDIATE")  # waits for another process's write
                row = conn.execute(
                    "DELETE FROM docs WHERE namespace = ? AND collection = ? AND id = ? "
                    f"RETURNING {_ROW_BYTES}",
                    (self._namespace, collection, doc_id),
                ).fetchone()
                if row is not None:
                    charge(conn, self._namespace, -int(row[0]), None, self._what)
                if index is not None:
                    _unindex(conn, index, self._namespace, collection, doc_id)
            return row is not None

        return await self._store.run(work, self._namespace)

    async def search(self, collection: str, text: str, limit: int = 20) -> _Page:
        """Documents of ``collection`` matching every word of ``text``, best first (ranked
        among this namespace's documents only). ``text`` is at most ``MAX_SEARCH_BYTES`` and
        ``MAX_SEARCH_WORDS`` words; ``limit`` is an int, taken as 1 to 100."""
        check_grant(self._grants, "read", "these documents")
        collection = _collection(collection)
        if not isinstance(text, str):
            raise BindingError("search text must be a string")
        if utf8_length(text, "search text") > MAX_SEARCH_BYTES:
            raise BindingError(f"search text may be at most {MAX_SEARCH_BYTES} bytes")
        words = re.findall(r"\w+", text)
        if len(words) > MAX_SEARCH_WORDS:
            raise BindingError(f"search text may have at most {MAX_SEARCH_WORDS} words")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise BindingError("limit must be an int")
        limit = max(1, min(limit, MAX_SEARCH_LIMIT))
        if not words:
            return []
        # Each word quoted: user text is never FTS5 query syntax.
        match = " ".join('"' + w.replace('"', "") + '"' for w in words)

        def work(conn: sqlite3.Connection) -> _Page:
            index = self._store.index_for_read(conn, self._namespace)
            if index is None:
                return []
            return _page(
                conn.execute(
                    f"SELECT d.id, d.body FROM {index} JOIN docs d ON d.namespace = ? "
                    f"AND d.collection = {index}.collection AND d.id = {index}.id "
                    f"WHERE {index} MATCH ? AND {index}.collection = ? "
                    f"ORDER BY bm25({index}) LIMIT ?",
                    (self._namespace, match, collection, limit),
                )
            )

        return await self._store.run(work, self._namespace)

    def _body_of(self, conn: sqlite3.Connection, collection: str, doc_id: str) -> str | None:
        row = conn.execute(
            "SELECT body FROM docs WHERE namespace = ? AND collection = ? AND id = ?",
            (self._namespace, collection, doc_id),
        ).fetchone()
        return None if row is None else str(row[0])
