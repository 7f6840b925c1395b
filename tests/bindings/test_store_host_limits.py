"""What a hostile worker can make KV, documents and blobs do to the host: store calls run off the
event loop under a deadline; search text, list offsets, pages, ids, metadata and argument types
are bounded at the binding's boundary; a put holds no file before its first chunk, waits a
bounded time for each, and a bucket writes a bounded number at once; a namespace's search
ranking is its own (and databases from before per-namespace indexes stay searchable)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.bindings._helpers import DESCRIBE, exact
from workerloader import Loader, WorkerCode, WorkerStub
from workerloader._errors import BindingError
from workerloader.bindings import BlobBucket, Documents, KvNamespace, _blobs, _docs, _kv
from workerloader.bindings._docs import fts_table

BINDING_ERROR = "workerloader._errors.BindingError"


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["id"] for doc in docs]


@pytest.fixture
def db(loader: Loader) -> Documents:
    return loader.db("t1")


@pytest.fixture
def kv(loader: Loader) -> KvNamespace:
    return loader.kv("t1")


@pytest.fixture
def bucket(tmp_path: Path) -> BlobBucket:
    return Loader(tmp_path).blobs("b")


def data_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "blobs" / "b").glob("*.data"))


# ---------------------------------------------------------------------------------------------
# Store calls run on the store's thread, under a deadline


@pytest.mark.parametrize("store", ["kv", "docs"])
async def test_a_store_call_leaves_the_event_loop_free_while_sqlite_works(
    loader: Loader, store: str
) -> None:
    kv, db = loader.kv("t1"), loader.db("t1")
    await kv.put("k", "v")
    await db.create("c", {"id": "a"})
    conn = loader._stores().kv.conn if store == "kv" else loader._stores().docs.conn
    entered, release = threading.Event(), threading.Event()

    def trace(sql: str) -> None:  # runs on the thread executing the statement
        if "ORDER BY" in sql and not entered.is_set():
            entered.set()
            release.wait(5)  # bounded: on the event loop this would stall it, not hang it

    conn.set_trace_callback(trace)
    try:
        listing: asyncio.Future[Any] = asyncio.ensure_future(
            kv.list() if store == "kv" else db.list("c")
        )
        assert await asyncio.to_thread(entered.wait, 5)
        assert not listing.done()  # SQLite is inside the statement and this loop still runs
        # A lookup, which runs at once on an idle connection, waits its turn on a busy one.
        lookup = asyncio.ensure_future(kv.get("k") if store == "kv" else db.get("c", "a"))
        await asyncio.sleep(0)
        assert not lookup.done()
        release.set()
        if store == "kv":
            assert [key["name"] for key in (await listing)["keys"]] == ["k"]
            assert await lookup == "v"
        else:
            assert await listing == [{"id": "a"}]
            assert await lookup == {"id": "a"}
    finally:
        conn.set_trace_callback(None)


async def test_an_interrupted_write_is_rolled_back_and_the_store_goes_on(
    loader: Loader, db: Documents
) -> None:
    await db.create("c", {"id": "a", "t": "hello"})
    conn = loader._stores().docs.conn

    def trace(sql: str) -> None:  # what the deadline does to a statement still running
        if sql.startswith("INSERT INTO docs_fts_"):
            conn.interrupt()

    conn.set_trace_callback(trace)
    try:
        with pytest.raises(
            BindingError, match=exact("the document store call was interrupted after 5 s")
        ):
            await db.create("c", {"id": "b", "t": "world"})
    finally:
        conn.set_trace_callback(None)
    assert not conn.in_transaction
    assert await db.get("c", "b") is None  # the document went with its index row
    await db.create("c", {"id": "b", "t": "world"})
    assert ids(await db.search("c", "world")) == ["b"]


async def test_a_call_that_cannot_start_before_its_deadline_is_not_run(
    monkeypatch: pytest.MonkeyPatch, kv: KvNamespace, db: Documents
) -> None:
    monkeypatch.setattr(_kv, "STORE_DEADLINE_S", 0.0, raising=False)
    with pytest.raises(
        BindingError,
        match=exact("the KV store is busy: the call could not start before its deadline"),
    ):
        await kv.put("k", "v")
    with pytest.raises(
        BindingError,
        match=exact("the document store is busy: the call could not start before its deadline"),
    ):
        await db.create("c", {"id": "a"})
    monkeypatch.undo()
    assert await kv.get("k") is None
    assert await db.get("c", "a") is None


@pytest.mark.parametrize("store", ["kv", "docs"])
async def test_a_namespaces_burst_of_slow_calls_delays_another_namespace_by_one(
    loader: Loader, store: str
) -> None:
    sqlite_store = getattr(loader._stores(), store)
    finished: list[str] = []

    async def call(namespace: str) -> None:
        def slow(conn: sqlite3.Connection) -> None:
            time.sleep(0.05)  # a slow statement, holding the store's thread

        await sqlite_store.run(slow, namespace)
        finished.append(namespace)

    burst = [asyncio.ensure_future(call("hog")) for _ in range(6)]
    await asyncio.sleep(0)  # the burst is queued first
    await asyncio.gather(call("other"), *burst)
    assert finished.index("other") == 1  # after the hog's call in the thread, not all six


# ---------------------------------------------------------------------------------------------
# Documents: bounded searches, offsets, pages, ids and arguments


async def test_search_text_is_bounded_in_bytes_and_words(db: Documents) -> None:
    await db.create("c", {"id": "a", "t": " ".join(f"w{i}" for i in range(40))})
    most = " ".join(f"w{i}" for i in range(32))
    assert ids(await db.search("c", most)) == ["a"]
    with pytest.raises(BindingError, match=exact("search text may have at most 32 words")):
        await db.search("c", most + " w39")
    with pytest.raises(BindingError, match=exact("search text may be at most 1024 bytes")):
        await db.search("c", "w1 " + " " * 1022)
    with pytest.raises(BindingError, match=exact("search text may be at most 1024 bytes")):
        await db.search("nothing", " ".join(f"w{i}" for i in range(400_000)))  # the audit's


async def test_a_list_offset_is_a_bounded_count(db: Documents) -> None:
    await db.create("c", {"id": "a", "n": 1})
    assert await db.list("c", order_by="n", cursor="10000") == []
    assert ids(await db.list("c", order_by="n", cursor=0)) == ["a"]  # type: ignore[arg-type]
    refused = exact("with order_by, cursor is the count of documents already listed, 0 to 10000")
    for cursor in ("10001", "100000000", "abc", "-1", " 1", "²", 1.5):
        with pytest.raises(BindingError, match=refused):
            await db.list("c", order_by="n", cursor=cursor)  # type: ignore[arg-type]


async def test_a_page_over_the_byte_budget_is_refused_and_smaller_pages_work(
    monkeypatch: pytest.MonkeyPatch, db: Documents
) -> None:
    monkeypatch.setattr(_docs, "MAX_PAGE_BYTES", 1000, raising=False)
    for i in range(5):
        await db.create("c", {"id": f"d{i}", "t": f"word {'x' * 290}"})
    too_big = exact(
        "these documents are over 1000 bytes, more than one call returns; "
        "ask for fewer at a time (a smaller limit) and page with cursor"
    )
    with pytest.raises(BindingError, match=too_big):
        await db.list("c")
    with pytest.raises(BindingError, match=too_big):
        await db.list("c", order_by="t")
    with pytest.raises(BindingError, match=too_big):
        await db.search("c", "word")
    assert ids(await db.list("c", limit=3)) == ["d0", "d1", "d2"]
    assert ids(await db.list("c", limit=3, cursor="d2")) == ["d3", "d4"]
    assert len(await db.search("c", "word", limit=3)) == 3


async def test_where_names_a_bounded_number_of_fields(db: Documents) -> None:
    await db.create("c", {"id": "a", **{f"f{i}": i for i in range(33)}})
    where = {f"f{i}": i for i in range(32)}
    assert ids(await db.list("c", where=where)) == ["a"]
    with pytest.raises(BindingError, match=exact("where may name at most 32 fields")):
        await db.list("c", where={f"f{i}": i for i in range(1200)})


async def test_document_ids_are_bounded_strings(db: Documents) -> None:
    longest = "i" * 512
    assert (await db.create("c", {"id": longest}))["id"] == longest
    assert (await db.create("c", {"id": 7}))["id"] == "7"
    assert await db.get("c", 7) == {"id": "7"}  # type: ignore[arg-type]
    bad = exact("a document id is a non-empty string of at most 512 bytes")
    for doc_id in ("i" * 513, "é" * 257, ["x"], {"a": 1}, True):
        with pytest.raises(BindingError, match=bad):
            await db.create("c", {"id": doc_id})
        with pytest.raises(BindingError, match=bad):
            await db.get("c", doc_id)  # type: ignore[arg-type]
        with pytest.raises(BindingError, match=bad):
            await db.delete("c", doc_id)  # type: ignore[arg-type]
    with pytest.raises(BindingError, match=bad):
        await db.list("c", cursor="i" * 513)
    assert sorted(ids(await db.list("c"))) == ["7", longest]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda db: db.list("c", order_by=5),
            "order_by is a field name, with a leading - for descending",
        ),
        (lambda db: db.list("c", where=[("a", 1)]), "where is a dict of field names to values"),
        (lambda db: db.list("c", limit="5"), "limit must be between 1 and 1000"),
        (lambda db: db.list("c", limit=True), "limit must be between 1 and 1000"),
        (lambda db: db.search("c", "x", limit="5"), "limit must be an int"),
        (lambda db: db.search("c", ["x"]), "search text must be a string"),
        (lambda db: db.update("c", "a", [1, 2]), "a document is a dict of its fields"),
        (lambda db: db.update("c", "a", {"x": {"y": math.inf}}), None),
        (
            lambda db: db.list("c", where={"x": 10**30}),
            "where ints must fit in 64 bits (as SQLite stores them)",
        ),
    ],
)
async def test_bad_document_arguments_are_binding_errors(
    db: Documents, call: Callable[[Any], Awaitable[object]], message: str | None
) -> None:
    await db.create("c", {"id": "a", "x": 1})
    with pytest.raises(BindingError, match=exact(message) if message else None):
        await call(db)
    assert await db.get("c", "a") == {"id": "a", "x": 1}


async def test_a_deeply_nested_document_is_a_binding_error(db: Documents) -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(BindingError, match=r"^a document must be JSON data: "):
        await db.create("c", {"id": "a", "deep": deep})


# ---------------------------------------------------------------------------------------------
# Documents: each namespace's search ranking is its own


async def probe_ranking(db: Documents, word: str) -> list[str]:
    """t19 of the audit: which of two documents ranks first depends on how rare ``word`` is
    against "filler" in the corpus bm25 counts from."""
    if not await db.get("probe", "d1"):
        await db.create("probe", {"id": "d1", "t": f"{word} filler filler filler filler filler"})
        await db.create("probe", {"id": "d2", "t": f"{word} {word} filler"})
        for i in range(38):
            await db.create("probe", {"id": f"pad{i}", "t": "pad"})
    return ids(await db.search("probe", f"{word} filler"))


async def test_another_namespaces_documents_do_not_change_a_search_ranking(
    loader: Loader,
) -> None:
    tenant_a, tenant_b = loader.db("team-a"), loader.db("team-b")
    before = await probe_ranking(tenant_b, "acquisition")
    for _ in range(60):
        await tenant_a.create("mail", {"body": "confidential acquisition of initech"})
    assert await probe_ranking(tenant_b, "acquisition") == before
    assert await tenant_b.search("mail", "acquisition") == []
    assert len(await tenant_a.search("mail", "acquisition")) == 20


LEGACY_SCHEMA = (
    """CREATE TABLE docs (
        namespace TEXT NOT NULL, collection TEXT NOT NULL, id TEXT NOT NULL,
        body TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (namespace, collection, id)
    ) WITHOUT ROWID""",
    "CREATE VIRTUAL TABLE docs_fts USING fts5(namespace UNINDEXED, collection UNINDEXED, "
    "id UNINDEXED, text)",
)


def write_legacy_database(path: Path, docs: list[tuple[str, str, str, str]]) -> None:
    """A documents database as written before per-namespace indexes: one shared docs_fts."""
    path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in LEGACY_SCHEMA:
            conn.execute(statement)
        for namespace, collection, doc_id, text in docs:
            body = json.dumps({"t": text})
            conn.execute(
                "INSERT INTO docs VALUES (?, ?, ?, ?, 0, 0)", (namespace, collection, doc_id, body)
            )
            conn.execute(
                "INSERT INTO docs_fts VALUES (?, ?, ?, ?)", (namespace, collection, doc_id, text)
            )


async def test_a_database_with_the_shared_index_is_moved_and_stays_searchable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data" / "documents.sqlite3"
    write_legacy_database(
        path,
        [
            ("t1", "users", "ada", "analytical engines"),
            ("t1", "users", "grace", "compilers and engines"),
            ("t1", "notes", "n1", "engines"),
            ("t2", "users", "ada", "someone else entirely"),
        ],
    )
    loader = Loader(tmp_path / "data")
    t1, t2 = loader.db("t1"), loader.db("t2")
    assert sorted(ids(await t1.search("users", "engines"))) == ["ada", "grace"]
    assert ids(await t1.search("notes", "engines")) == ["n1"]
    assert ids(await t2.search("users", "someone")) == ["ada"]
    assert await t2.search("users", "engines") == []
    # The moved rows are the documents' index rows: updates and deletes keep them in step.
    await t1.update("users", "grace", {"t": "navy"})
    assert ids(await t1.search("users", "engines")) == ["ada"]
    assert await t1.delete("users", "ada") is True
    assert await t1.search("users", "engines") == []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "docs_fts" not in names
        assert {fts_table("t1"), fts_table("t2")} <= names
        for namespace, count in (("t1", 2), ("t2", 1)):
            assert conn.execute(f"SELECT count(*) FROM {fts_table(namespace)}").fetchone() == (
                count,
            )
    # A second open finds nothing left to move.
    assert ids(await Loader(tmp_path / "data").db("t1").search("notes", "engines")) == ["n1"]


# ---------------------------------------------------------------------------------------------
# KV: arguments checked at the boundary


async def test_a_kv_prefix_or_cursor_is_a_bounded_string(kv: KvNamespace) -> None:
    longest = "\U0010ffff" * (512 // 4)  # no successor at any length
    await kv.put(longest + "", "v")
    assert [k["name"] for k in (await kv.list(prefix=longest))["keys"]] == [longest]
    too_long = exact("prefix may be at most 512 bytes")
    with pytest.raises(BindingError, match=too_long):
        await kv.list(prefix="\U0010ffff" * 5000)  # the audit's: was a RecursionError
    with pytest.raises(BindingError, match=exact("cursor may be at most 512 bytes")):
        await kv.list(cursor="k" * 513)
    with pytest.raises(BindingError, match=exact("prefix must be a string")):
        await kv.list(prefix=5)  # type: ignore[arg-type]
    with pytest.raises(BindingError, match=exact("cursor must be a string")):
        await kv.list(cursor=5)  # type: ignore[arg-type]
    with pytest.raises(BindingError, match=exact("limit must be between 1 and 1000")):
        await kv.list(limit="5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ttl", "message"),
    [
        (math.nan, "ttl must be a finite number of seconds"),
        (math.inf, "ttl must be a finite number of seconds"),
        ("60", "ttl must be a number of seconds"),
        (True, "ttl must be a number of seconds"),
        (10**400, "ttl must be at most 3153600000 seconds"),  # was an OverflowError
        (1e308, "ttl must be at most 3153600000 seconds"),  # a float, as an int
        (-(10**400), "ttl must be positive"),  # was an OverflowError too
    ],
)
async def test_a_ttl_is_a_finite_number(kv: KvNamespace, ttl: Any, message: str) -> None:
    with pytest.raises(BindingError, match=exact(message)):
        await kv.put("k", "v", ttl=ttl)
    assert await kv.get("k") is None
    await kv.put("k", "v", ttl=3153600000.0)  # the most: expires in a hundred years
    assert await kv.get("k") == "v"


async def test_kv_values_that_are_not_text_are_binding_errors(kv: KvNamespace) -> None:
    await kv.put("raw", b"\xff\xfe")
    with pytest.raises(
        BindingError, match=exact("the value of 'raw' is not UTF-8 text; get it as bytes")
    ):
        await kv.get("raw")
    assert await kv.get("raw", type="bytes") == b"\xff\xfe"
    with pytest.raises(BindingError, match=exact("a KV key is not valid Unicode text")):
        await kv.put("\ud800", "v")
    with pytest.raises(BindingError, match=exact("a KV value is not valid Unicode text")):
        await kv.put("k", "\ud800")
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(BindingError, match=r"^a KV value must be str, bytes or JSON data: "):
        await kv.put("k", deep)


# ---------------------------------------------------------------------------------------------
# Blobs: metadata, listing, and puts that hold files


async def test_metadata_is_a_bounded_dict_of_strings(bucket: BlobBucket, tmp_path: Path) -> None:
    fits = {"m": "a" * (8192 - len('{"m": ""}'))}
    assert (await bucket.put("k", b"x", metadata=fits))["metadata"] == fits
    with pytest.raises(BindingError, match=exact("metadata may be at most 8192 bytes as JSON")):
        await bucket.put("k", b"y", metadata={"m": "a" * 3_900_000})
    bad = exact("metadata is a dict of string keys to string values")
    for metadata in ([1, 2], {"m": ["x"]}, {"m": None}, {1: "x"}):
        with pytest.raises(BindingError, match=bad):
            await bucket.put("k", b"y", metadata=metadata)  # type: ignore[arg-type]
    obj = await bucket.get("k")
    assert obj is not None
    assert (await obj.bytes(), obj.metadata) == (b"x", fits)
    assert len(data_files(tmp_path)) == 1


async def test_a_list_page_stops_at_the_byte_budget_and_pages_on(
    monkeypatch: pytest.MonkeyPatch, bucket: BlobBucket
) -> None:
    monkeypatch.setattr(_blobs, "MAX_PAGE_BYTES", 2000, raising=False)
    for i in range(10):
        await bucket.put(f"k{i}", b"x", metadata={"m": "a" * 400})
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = await bucket.list(cursor=cursor)
        assert 1 <= len(page["objects"]) < 10
        seen += [head["key"] for head in page["objects"]]
        if not page["truncated"]:
            break
        cursor = page["cursor"]
    assert seen == [f"k{i}" for i in range(10)]


async def test_list_reads_a_bounded_part_of_each_head(bucket: BlobBucket, tmp_path: Path) -> None:
    # A head stored before metadata had a cap: get and head read it, list passes over it.
    await bucket.put("small", b"s")
    await bucket.put("old", b"o")
    head_path = bucket._head_path("old")
    head = json.loads(head_path.read_text())
    head["metadata"] = {"m": "a" * 100_000}
    head_path.write_text(json.dumps(head))
    assert [h["key"] for h in (await bucket.list())["objects"]] == ["small"]
    assert (await bucket.head("old") or {}).get("metadata") == head["metadata"]
    obj = await bucket.get("old")
    assert obj is not None
    assert await obj.bytes() == b"o"


async def test_lists_of_one_bucket_take_one_pool_thread_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = Loader(tmp_path)
    for bucket in ("a", "b"):
        await loader.blobs(bucket).put("k", b"v")
    active = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0, "together": 0}
    lock = threading.Lock()
    load_head = _blobs._load_head

    def slow_load_head(path: Path, most: int) -> dict[str, Any] | None:
        bucket = path.parent.name
        with lock:
            active[bucket] += 1
            peak[bucket] = max(peak[bucket], active[bucket])
            peak["together"] = max(peak["together"], active["a"] + active["b"])
        time.sleep(0.05)
        with lock:
            active[bucket] -= 1
        return load_head(path, most)

    monkeypatch.setattr(_blobs, "_load_head", slow_load_head)
    # Four lists of each bucket at once, each through a binding of its own, as four workers'.
    await asyncio.gather(*(loader.blobs(b).list() for b in "aabbaabb"))
    assert peak == {"a": 1, "b": 1, "together": 2}  # buckets overlap, one bucket's lists never


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.list(prefix=5), "prefix is a string of at most 1024 bytes"),
        (lambda b: b.list(cursor="k" * 1025), "cursor is a string of at most 1024 bytes"),
        (lambda b: b.list(limit="5"), "limit must be between 1 and 1000"),
        (lambda b: b.put("k", 5), "a blob value is bytes, str, or a list of bytes chunks"),
        (lambda b: b.head(5), "a blob key is a non-empty string of at most 1024 bytes"),
        (lambda b: b.delete("k" * 1025), "a blob key is a non-empty string of at most 1024 bytes"),
    ],
)
async def test_bad_blob_arguments_are_binding_errors(
    bucket: BlobBucket, call: Callable[[Any], Awaitable[object]], message: str
) -> None:
    with pytest.raises(BindingError, match=exact(message)):
        await call(bucket)


async def test_a_blob_read_takes_int_offsets_and_lengths(bucket: BlobBucket) -> None:
    await bucket.put("k", b"abc")
    obj = await bucket.get("k")
    assert obj is not None
    for offset, length in ((0, "x"), ("0", 1), (0, 1.5), (True, 1), (10**30, 1)):
        with pytest.raises(BindingError, match=r"^read at most 262144 bytes from"):
            await obj.read(offset, length)  # type: ignore[arg-type]
    assert await obj.read(1, 5) == b"bc"


class Source:
    """A chunk function that gives ``chunks`` one per call, then waits until released."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        self.waiting.set()
        await self.release.wait()
        return b""


async def test_a_put_opens_no_file_before_its_first_chunk(
    bucket: BlobBucket, tmp_path: Path
) -> None:
    source = Source()
    put = asyncio.ensure_future(bucket.put("k", source))
    await source.waiting.wait()
    assert data_files(tmp_path) == []  # a source that never answers holds nothing
    source.release.set()
    assert (await put)["size"] == 0
    assert len(data_files(tmp_path)) == 1


async def test_a_chunk_that_does_not_come_in_time_ends_the_put(
    monkeypatch: pytest.MonkeyPatch, bucket: BlobBucket, tmp_path: Path
) -> None:
    monkeypatch.setattr(_blobs, "CHUNK_TIMEOUT_S", 0.01)
    late = exact("the chunk function gave no chunk for 0.01 s; nothing was stored")
    with pytest.raises(BindingError, match=late):
        await bucket.put("k", Source())
    with pytest.raises(BindingError, match=late):
        await bucket.put("k", Source(b"first"))  # its data file is removed again
    assert data_files(tmp_path) == []
    assert await bucket.get("k") is None


async def test_a_bucket_writes_a_bounded_number_of_objects_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_blobs, "MAX_OPEN_PUTS", 2, raising=False)
    bucket = Loader(tmp_path).blobs("b")
    sources = [Source(b"x") for _ in range(3)]
    puts = [asyncio.ensure_future(bucket.put(f"k{i}", s)) for i, s in enumerate(sources)]
    await sources[0].waiting.wait()
    await sources[1].waiting.wait()
    for _ in range(10):
        await asyncio.sleep(0)
    assert sources[2].chunks == [b"x"]  # not asked for a chunk yet: it holds nothing
    assert len(data_files(tmp_path)) == 2
    for source in sources:
        source.release.set()
    assert [(await put)["size"] for put in puts] == [1, 1, 1]
    assert len(data_files(tmp_path)) == 3


# ---------------------------------------------------------------------------------------------
# End to end: the audit's calls from a worker in the real sandbox

MAIN = (
    """
import asyncio
from workers import WorkerEntrypoint, sdk

"""
    + DESCRIBE
    + """

async def never():
    await asyncio.Event().wait()


class Api(WorkerEntrypoint):
    async def attempt(self, op):
        ops = {
            "db.search": lambda: sdk.db.search(
                "nothing", " ".join(f"w{i}" for i in range(400_000))),
            "db.cursor": lambda: sdk.db.list("c", order_by="a", cursor="abc"),
            "kv.prefix": lambda: sdk.kv.list(prefix="\\U0010FFFF" * 5000),
            "kv.ttl": lambda: sdk.kv.put("k", "v", ttl=float("nan")),
            "blobs.metadata": lambda: sdk.blobs.put("k", b"x", metadata={"m": "a" * 9000}),
            "blobs.never": lambda: sdk.blobs.put("k", never),
            "blobs.list": lambda: sdk.blobs.list(prefix=5),
        }
        return await describe(ops[op]())
"""
)


@pytest.fixture
async def sandboxed(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


async def test_a_worker_gets_binding_errors_for_the_audits_calls(
    sandboxed: Loader, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_blobs, "CHUNK_TIMEOUT_S", 0.05)
    sdk = sandboxed.sdk("t1")
    stub: WorkerStub = sandboxed.get(
        "w", lambda: WorkerCode(main_module="main.py", modules={"main.py": MAIN}, env={"SDK": sdk})
    )
    api: Any = stub.get_entrypoint("Api")
    expected = {
        "db.search": "search text may be at most 1024 bytes",
        "db.cursor": "with order_by, cursor is the count of documents already listed, 0 to 10000",
        "kv.prefix": "prefix may be at most 512 bytes",
        "kv.ttl": "ttl must be a finite number of seconds",
        "blobs.metadata": "metadata may be at most 8192 bytes as JSON",
        "blobs.never": "the chunk function gave no chunk for 0.05 s; nothing was stored",
        "blobs.list": "prefix is a string of at most 1024 bytes",
    }
    for op, message in expected.items():
        assert await api.attempt(op) == [BINDING_ERROR, False, message], op
    assert await sandboxed.kv("t1").get("k") is None
    assert list((tmp_path / "data" / "blobs" / "t1").glob("*.data")) == []


async def test_closing_the_loader_stops_the_stores_threads(tmp_path: Path) -> None:
    # Each Loader left two threads and two open databases behind.
    def store_threads() -> int:
        return sum(t.name.startswith("workerloader-store") for t in threading.enumerate())

    before = store_threads()
    async with Loader(tmp_path / "data", pool_size=1) as loader:
        await loader.kv("a").put("k", "v")
        await loader.db("a").create("c", {"x": 1})
        assert store_threads() == before + 2
    assert store_threads() == before


async def test_expired_keys_are_deleted_not_only_hidden(loader: Loader) -> None:
    # Reads skipped them, but a worker putting short-lived keys grew the database forever.
    kv = loader.kv("t1")
    for i in range(100):
        await kv.put(f"gone-{i}", "x", ttl=0.001)
    await asyncio.sleep(0.05)  # all of them expire
    for i in range(64):  # puts go on; every 64th also deletes expired keys
        await kv.put(f"kept-{i}", "y")
    with contextlib.closing(sqlite3.connect(loader.data_dir / "kv.sqlite3")) as conn:
        (expired,) = conn.execute("SELECT count(*) FROM kv WHERE key LIKE 'gone-%'").fetchone()
        (kept,) = conn.execute("SELECT count(*) FROM kv WHERE key LIKE 'kept-%'").fetchone()
    assert (expired, kept) == (0, 64)
