"""Storage quotas: each namespace's KV, documents, SQL database and blob bucket hold at most
``storage_quota_mb``. A write past it is ``QuotaExceeded`` and keeps nothing; writes that do not
grow a store (overwrites with less, deletes) go through, so a full namespace can make room;
other namespaces are not touched; the counts survive a restart and are made for data written
before quotas existed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.bindings._helpers import DESCRIBE
from workerloader import BindingError, Loader, QuotaExceeded, WorkerCode
from workerloader.bindings import _docs, _kv
from workerloader.bindings._quota import on_disk

MB = 1 << 20
KV_VALUE = 512 * 1024  # the largest KV value
DOC_FIELD = 200 * 1024  # one field of a document under its 256 KiB cap


def kv_row(namespace: str, key: str, value: int) -> int:
    """What a KV row counts: its namespace, key, value and overhead."""
    return len(namespace) + len(key) + value + _kv.ROW_OVERHEAD


def doc_row(namespace: str, collection: str, doc_id: str, body: str) -> int:
    """What a document counts: its JSON with its index, names and overhead."""
    body_bytes = (1 + _docs.INDEX_FACTOR) * len(body)
    return body_bytes + len(namespace + collection + doc_id) + _docs.ROW_OVERHEAD


def kv_usage(data: Path, namespace: str) -> int | None:
    with sqlite3.connect(data / "kv.sqlite3") as conn:
        row = conn.execute("SELECT bytes FROM usage WHERE namespace = ?", (namespace,)).fetchone()
    return None if row is None else int(row[0])


def docs_usage(data: Path, namespace: str) -> int | None:
    with sqlite3.connect(data / "documents.sqlite3") as conn:
        row = conn.execute("SELECT bytes FROM usage WHERE namespace = ?", (namespace,)).fetchone()
    return None if row is None else int(row[0])


async def fill(write: Callable[[int], Awaitable[object]], most: int = 100) -> int:
    """Call ``write(i)`` until it raises QuotaExceeded; how many writes went through."""
    for i in range(most):
        try:
            await write(i)
        except QuotaExceeded:
            return i
    raise AssertionError(f"{most} writes and no QuotaExceeded")


def test_a_quota_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_quota_mb must be at least 1"):
        Loader(tmp_path, storage_quota_mb=0)


def test_quota_exceeded_is_a_binding_error() -> None:
    assert issubclass(QuotaExceeded, BindingError)


# ---------------------------------------------------------------------------------------------
# KV


async def test_kv_refuses_a_put_past_the_quota_and_keeps_nothing_of_it(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    kv = loader.kv("acme")
    stored = await fill(lambda i: kv.put(f"k{i}", b"x" * KV_VALUE))
    assert stored == 1  # 2 x 512 KiB and their keys do not fit in 1 MiB
    assert await kv.get("k1") is None
    with pytest.raises(QuotaExceeded) as refused:
        await kv.put("k1", b"x" * KV_VALUE)
    message = str(refused.value)
    row = kv_row("acme", "k1", KV_VALUE)
    assert message.startswith(
        f"the KV namespace 'acme' holds {row} bytes: this write of {row} "
        "more bytes would take it past its storage quota of 1048576 bytes (1 MB)"
    )
    assert "[server] storage_quota_mb" in message
    assert kv_usage(tmp_path, "acme") == row


async def test_kv_writes_that_do_not_grow_it_go_through_at_the_quota(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    kv = loader.kv("acme")
    await kv.put("a", b"x" * KV_VALUE)
    await kv.put("b", b"x" * (MB - kv_row("acme", "a", KV_VALUE) - kv_row("acme", "b", 0)))
    assert kv_usage(tmp_path, "acme") == MB  # exactly full
    with pytest.raises(QuotaExceeded):
        await kv.put("c", "1")
    await kv.put("a", b"y" * KV_VALUE)  # the same size again
    await kv.put("a", "small")  # smaller
    assert kv_usage(tmp_path, "acme") == MB - KV_VALUE + 5
    await kv.delete("b")
    await kv.delete("b")  # absent: nothing more to give back
    assert kv_usage(tmp_path, "acme") == kv_row("acme", "a", 5)
    await kv.put("c", b"z" * KV_VALUE)  # room again
    assert await kv.get("c", "bytes") == b"z" * KV_VALUE


async def test_kv_quotas_are_per_namespace(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    await fill(lambda i: loader.kv("full").put(f"k{i}", b"x" * KV_VALUE))
    await loader.kv("other").put("k", b"x" * KV_VALUE)  # its own megabyte
    assert kv_usage(tmp_path, "other") == kv_row("other", "k", KV_VALUE)


async def test_expired_kv_keys_give_their_bytes_back_as_they_are_purged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kv, "_PURGE_EVERY", 1)
    loader = Loader(tmp_path, storage_quota_mb=1)
    kv, other = loader.kv("acme"), loader.kv("other")
    await kv.put("short", b"x" * KV_VALUE, ttl=0.05)
    await other.put("short", "v", ttl=0.05)
    await asyncio.sleep(0.1)
    await kv.put("k", "v")  # purges its own namespace's expired keys
    assert kv_usage(tmp_path, "acme") == kv_row("acme", "k", 1)
    expiring = kv_row("other", "short", 1) + kv_row("other", "short", 0)  # its index entry too
    assert kv_usage(tmp_path, "other") == expiring  # not another namespace's
    await kv.put("a", b"x" * KV_VALUE)  # the expired key's bytes are free again


async def test_kv_usage_is_counted_for_a_database_from_before_quotas(tmp_path: Path) -> None:
    await Loader(tmp_path).kv("acme").put("k", b"x" * KV_VALUE)
    with sqlite3.connect(tmp_path / "kv.sqlite3") as conn:
        conn.execute("DROP TABLE usage")  # as written by a version without quotas
    kv = Loader(tmp_path, storage_quota_mb=1).kv("acme")
    with pytest.raises(QuotaExceeded):
        await kv.put("k2", b"x" * KV_VALUE)
    assert kv_usage(tmp_path, "acme") == kv_row("acme", "k", KV_VALUE)


# ---------------------------------------------------------------------------------------------
# Documents


async def test_documents_refuse_a_create_or_update_past_the_quota(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=4)
    db = loader.db("acme")
    stored = await fill(lambda i: db.create("notes", {"id": f"n{i}", "text": "x" * DOC_FIELD}))
    big = json.dumps({"text": "x" * DOC_FIELD})
    assert stored == 4 * MB // doc_row("acme", "notes", "n0", big)  # 6: ~200 KiB, three times
    assert await db.get("notes", f"n{stored}") is None
    await fill(lambda i: db.create("small", {"id": f"s{i}", "text": "x" * 10_000}))
    used = docs_usage(tmp_path, "acme")
    assert used is not None
    assert 4 * MB - 3 * 10_100 < used <= 4 * MB
    with pytest.raises(QuotaExceeded, match=r"^the documents of namespace 'acme' holds"):
        await db.update("notes", "n0", {"more": "y" * 20_000})
    assert "more" not in (await db.get("notes", "n0") or {})
    await db.update("notes", "n0", {"text": "short"})  # shrinks it
    await db.delete("notes", "n1")
    small = json.dumps({"text": "short"})
    shrunk = (1 + _docs.INDEX_FACTOR) * (len(big) - len(small))
    assert docs_usage(tmp_path, "acme") == used - shrunk - doc_row("acme", "notes", "n1", big)
    await db.create("notes", {"id": "n9", "text": "x" * DOC_FIELD})  # room again


async def test_documents_usage_is_counted_for_a_database_from_before_quotas(
    tmp_path: Path,
) -> None:
    await Loader(tmp_path).db("acme").create("notes", {"id": "a", "text": "hello"})
    with sqlite3.connect(tmp_path / "documents.sqlite3") as conn:
        conn.execute("DROP TABLE usage")  # as written by a version without quotas
    db = Loader(tmp_path, storage_quota_mb=1).db("acme")
    await db.get("notes", "a")  # opens the store, which counts what is there
    assert docs_usage(tmp_path, "acme") == doc_row("acme", "notes", "a", '{"text": "hello"}')
    await db.delete("notes", "a")  # uncounted, this would take the usage below zero
    assert docs_usage(tmp_path, "acme") == 0


# ---------------------------------------------------------------------------------------------
# SQL


async def test_sql_refuses_to_grow_the_database_past_the_quota(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    sql = loader.sql("acme")
    await sql.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    insert = sql.prepare("INSERT INTO t (v) VALUES (zeroblob(200000))")
    stored = await fill(lambda i: insert.run())
    assert 3 <= stored <= 5
    with pytest.raises(QuotaExceeded, match=r"^the SQL database 'acme' holds \d+ bytes and its"):
        await insert.run()
    count = sql.prepare("SELECT count(*) AS n FROM t")
    assert await count.first("n") == stored  # nothing of the refused statements was kept
    await sql.exec("DELETE FROM t WHERE id = 1")  # deletes work at the quota
    await insert.run()  # and make room (a freed page is reused)
    assert await count.first("n") == stored


async def test_sql_temporary_tables_are_held_to_the_quota_too(tmp_path: Path) -> None:
    sql = Loader(tmp_path, storage_quota_mb=1).sql("acme")
    await sql.exec("CREATE TEMP TABLE scratch (v BLOB)")
    insert = sql.prepare("INSERT INTO scratch VALUES (zeroblob(300000))")
    assert await fill(lambda i: insert.run()) == 3  # 300 kB rows in 1 MiB
    with pytest.raises(
        QuotaExceeded, match=r"^the SQL database 'acme' holds 4096 bytes and its temporary tables 9"
    ):
        await insert.run()


# ---------------------------------------------------------------------------------------------
# Blobs


def bucket_bytes(tmp_path: Path, bucket: str) -> int:
    return sum(on_disk(f.stat().st_size) for f in (tmp_path / "blobs" / bucket).iterdir())


async def test_blobs_refuse_a_put_past_the_quota_and_leave_no_file(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    bucket = loader.blobs("acme")
    stored = await fill(lambda i: bucket.put(f"o{i}", b"x" * 300_000))
    assert stored == 3
    files = sorted(p.name for p in (tmp_path / "blobs" / "acme").iterdir())
    with pytest.raises(QuotaExceeded, match=r"^the blob bucket 'acme' holds"):
        await bucket.put("big", [b"y" * 100_000] * 5)  # refused at a chunk midway
    assert sorted(p.name for p in (tmp_path / "blobs" / "acme").iterdir()) == files
    assert await bucket.head("big") is None
    await bucket.put("o0", b"small")  # a replacement that shrinks it (with room beside it)
    assert await bucket.delete("o1")
    await bucket.put("o9", b"z" * 300_000)  # room again
    assert (await bucket.head("o9") or {})["size"] == 300_000


async def test_empty_blobs_count_the_blocks_their_files_take(tmp_path: Path) -> None:
    bucket = Loader(tmp_path, storage_quota_mb=1).blobs("acme")
    stored = await fill(lambda i: bucket.put(f"o{i}", b""), most=200)
    assert stored == 128  # a block for the (empty) data, one for the head: 8 KiB each
    assert bucket_bytes(tmp_path, "acme") == MB


async def test_a_chunked_blob_put_is_stopped_at_the_quota(tmp_path: Path) -> None:
    bucket = Loader(tmp_path, storage_quota_mb=1).blobs("acme")
    asked = 0

    async def chunk() -> bytes:
        nonlocal asked
        asked += 1
        return b"c" * 65536  # without end

    with pytest.raises(QuotaExceeded):
        await bucket.put("endless", chunk)
    assert asked == 17  # 16 chunks fill the megabyte; the 17th is refused
    assert list((tmp_path / "blobs" / "acme").iterdir()) == []


async def test_blob_usage_is_shared_by_a_buckets_bindings_and_counted_on_restart(
    tmp_path: Path,
) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    await loader.blobs("acme").put("a", b"x" * 600_000)
    with pytest.raises(QuotaExceeded):  # another binding on the same bucket sees the bytes
        await loader.blobs("acme", read=False).put("b", b"x" * 600_000)
    await loader.blobs("other").put("b", b"x" * 600_000)  # its own quota
    restarted = Loader(tmp_path, storage_quota_mb=1)
    with pytest.raises(QuotaExceeded, match=f"holds {bucket_bytes(tmp_path, 'acme')} bytes"):
        await restarted.blobs("acme").put("b", b"x" * 600_000)


async def test_no_quota_with_none(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=None)
    kv = loader.kv("acme")
    for i in range(3):
        await kv.put(f"k{i}", b"x" * KV_VALUE)
    assert kv_usage(tmp_path, "acme") == 3 * kv_row("acme", "k0", KV_VALUE)  # counted all the same


# ---------------------------------------------------------------------------------------------
# From a worker, in the real sandbox

MAIN = (
    "from workers import WorkerEntrypoint, sdk\n"
    + DESCRIBE
    + """
class Default(WorkerEntrypoint):
    async def put(self, key, size):
        return await describe(sdk.kv.put(key, "x" * size))
"""
)


async def test_a_worker_gets_quota_exceeded_as_itself(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=1, storage_quota_mb=1) as loader:
        code = WorkerCode(
            main_module="main.py", modules={"main.py": MAIN}, env={"SDK": loader.sdk("acme")}
        )
        worker = loader.get("w", lambda: code).get_entrypoint()
        assert await worker.put("a", KV_VALUE) == ["ok", None]
        kind, is_permission, message = await worker.put("b", KV_VALUE)
        assert kind == "workerloader._errors.QuotaExceeded"
        assert not is_permission
        assert message.startswith("the KV namespace 'acme' holds")
