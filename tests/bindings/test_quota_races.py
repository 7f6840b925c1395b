"""Quotas under concurrency, cancellation and failure: a bucket's count stays what its files take
(deletes racing puts, puts of one key at once, puts cancelled midway, a commit the disk
refuses), no data file is left that no head names, a KV namespace full of expired keys can put
again, and a write waits for another process's instead of failing."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from workerloader import BindingError, Loader, QuotaExceeded
from workerloader.bindings import BlobBucket, _blobs
from workerloader.bindings._quota import on_disk
from workerloader.bindings._sqlite import call_deadline

MB = 1 << 20


def on_disk_now(root: Path) -> int:
    return sum(on_disk(f.stat().st_size) for f in root.iterdir()) if root.exists() else 0


def acme_bucket(tmp_path: Path, **options: Any) -> tuple[Loader, BlobBucket, Path]:
    """A Loader on ``tmp_path`` (with ``options``), its bucket "acme" and that bucket's
    directory."""
    loader = Loader(tmp_path, **options)
    return loader, loader.blobs("acme"), tmp_path / "blobs" / "acme"


def counted(loader: Loader, bucket: str) -> int:
    used = loader._bucket_usage[loader.data_dir / "blobs" / bucket]._used
    assert used is not None
    return used


def unnamed_data_files(bucket: BlobBucket, root: Path) -> list[str]:
    """Data files no head names (no call could ever delete them)."""
    named = set()
    for head in root.glob("*.head"):
        found = _blobs._load_head(head, _blobs.MAX_LEGACY_HEAD_BYTES)
        if found is not None:
            named.add(found["data"])
    return [f.name for f in root.glob("*.data") if f.name not in named]


def slow_head_reads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[int]:
    """Make every read of a blob head take ``seconds``; the most read at once, as it grows."""
    active, peak, lock = [0], [0], threading.Lock()
    load_head = _blobs._load_head

    def slow_load_head(path: Path, most: int, **strict: bool) -> dict[str, Any] | None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(seconds)
        with lock:
            active[0] -= 1
        return load_head(path, most, **strict)

    monkeypatch.setattr(_blobs, "_load_head", slow_load_head)
    return peak


async def test_deletes_racing_puts_of_one_key_keep_the_count_exact(tmp_path: Path) -> None:
    loader, bucket, root = acme_bucket(tmp_path, storage_quota_mb=8)
    await bucket.put("base", b"x" * 400_000)  # a count a double give-back shows in
    metadata = {"m": "x" * 8000}  # an old head of three blocks

    async def late_delete() -> None:
        await asyncio.sleep(random.uniform(0, 0.004))  # at any point of the put's commit
        await bucket.delete("k")

    for _ in range(150):
        await bucket.put("k", b"", metadata)
        await asyncio.gather(bucket.put("k", b""), late_delete())
    await bucket.delete("k")
    assert counted(loader, "acme") == on_disk_now(root) == on_disk(400_000) + 4096


async def test_puts_of_one_key_at_once_leave_no_data_file_unnamed(tmp_path: Path) -> None:
    loader, bucket, root = acme_bucket(tmp_path, storage_quota_mb=8)
    for _ in range(20):
        await asyncio.gather(*(bucket.put("k", os.urandom(10_000)) for _ in range(4)))
    assert unnamed_data_files(bucket, root) == []
    assert counted(loader, "acme") == on_disk_now(root)


async def test_puts_cancelled_midway_leave_no_file_and_no_count(tmp_path: Path) -> None:
    loader, bucket, root = acme_bucket(tmp_path, storage_quota_mb=8)

    def chunks() -> Callable[[], Awaitable[bytes]]:
        left = 4

        async def chunk() -> bytes:
            nonlocal left
            await asyncio.sleep(0.002)
            left -= 1
            return b"x" * 65536 if left >= 0 else b""

        return chunk

    outcomes = set()
    for i in range(60):
        put = asyncio.ensure_future(bucket.put(f"k{i % 7}", chunks()))
        await asyncio.sleep(random.random() * 0.015)  # at any point, the commit's too
        put.cancel()
        try:
            await put
            outcomes.add("stored")
        except asyncio.CancelledError:
            outcomes.add("cancelled")
    assert "cancelled" in outcomes
    assert unnamed_data_files(bucket, root) == []
    assert not list(root.glob("*.tmp"))
    assert counted(loader, "acme") == on_disk_now(root)


async def test_a_commit_the_disk_refuses_is_a_binding_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, bucket, root = acme_bucket(tmp_path, storage_quota_mb=8)
    await bucket.put("kept", b"v")

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(BindingError) as refused:
        await bucket.put("k", b"x" * 100_000)
    assert str(refused.value) == (
        "the object 'k' could not be stored (No space left on device); nothing was stored"
    )
    assert str(tmp_path) not in str(refused.value)
    monkeypatch.undo()
    assert sorted(p.suffix for p in root.iterdir()) == [".data", ".head"]  # "kept" alone
    assert counted(loader, "acme") == on_disk_now(root)


async def test_at_the_quota_a_blob_is_deleted_before_it_is_put_again(tmp_path: Path) -> None:
    loader = Loader(tmp_path, storage_quota_mb=1)
    bucket = loader.blobs("acme")
    await bucket.put("big", b"x" * 900_000)
    while True:  # up to the last block
        try:
            await bucket.put(f"e{random.random()}", b"")
        except QuotaExceeded:
            break
    # The new object needs room beside the old until it replaces it (as docs/bindings.md says).
    with pytest.raises(QuotaExceeded):
        await bucket.put("big", b"small")
    assert await bucket.delete("big")
    await bucket.put("big", b"small")
    assert (await bucket.head("big") or {})["size"] == 5


async def test_cancelled_lists_still_hold_their_buckets_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = Loader(tmp_path)
    bucket = loader.blobs("acme")
    await bucket.put("k", b"v")
    peak = slow_head_reads(monkeypatch, 0.03)
    for _ in range(6):
        listing = asyncio.ensure_future(loader.blobs("acme").list())
        await asyncio.sleep(0.005)
        listing.cancel()
    await asyncio.sleep(0.3)
    assert peak[0] == 1


async def test_a_kv_namespace_full_of_expired_keys_can_put_again(tmp_path: Path) -> None:
    kv = Loader(tmp_path, storage_quota_mb=1).kv("acme")
    for i in range(3):
        try:
            await kv.put(f"session-{i}", b"x" * 400_000, ttl=0.05)
        except QuotaExceeded:
            break
    await asyncio.sleep(0.1)  # all expired: no call can name them any more
    assert (await kv.list())["keys"] == []
    await kv.put("fresh", b"y" * 400_000)
    await kv.put("fresh2", b"y" * 400_000)
    assert await kv.get("fresh2", "bytes") == b"y" * 400_000


@pytest.mark.parametrize("store", ["kv", "documents"])
async def test_a_write_waits_for_another_processs_write(tmp_path: Path, store: str) -> None:
    loader = Loader(tmp_path)
    kv, db = loader.kv("acme"), loader.db("acme")
    await kv.put("k", "v")
    await db.create("notes", {"id": "n", "text": "v"})
    locked, done = threading.Event(), threading.Event()

    def other_process() -> None:
        # Another connection (as `workerloader exec` beside the service) writes and commits
        # while this one's write is waiting.
        conn = sqlite3.connect(tmp_path / f"{store}.sqlite3", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO usage VALUES ('other', 1) ON CONFLICT DO NOTHING")
        locked.set()
        time.sleep(0.3)
        conn.execute("COMMIT")
        conn.close()
        done.set()

    thread = threading.Thread(target=other_process)
    thread.start()
    await asyncio.to_thread(locked.wait)
    if store == "kv":
        await kv.put("k", "w")
        assert await kv.get("k") == "w"
    else:
        await db.update("notes", "n", {"text": "w"})
        assert (await db.get("notes", "n") or {})["text"] == "w"
    await asyncio.to_thread(thread.join)
    assert done.is_set()


async def test_sql_says_which_is_full_after_its_rollback_too(tmp_path: Path) -> None:
    sql = Loader(tmp_path, storage_quota_mb=1).sql("acme")
    await sql.exec("CREATE TABLE small (v)")
    await sql.prepare("INSERT INTO small VALUES (zeroblob(100000))").run()
    await sql.exec("CREATE TEMP TABLE scratch (v BLOB)")
    await sql.exec("DROP TABLE scratch")
    await sql.exec("CREATE TEMP TABLE scratch (v BLOB)")
    full = (
        r"^the SQL database 'acme' holds 1\d{5} bytes and its temporary tables \d+: this "
        r"write would take one of them past the storage quota each may fill, 1048576 bytes"
    )
    with pytest.raises(QuotaExceeded, match=full):
        await sql.prepare("INSERT INTO scratch VALUES (zeroblob(2000000))").run()
    with pytest.raises(QuotaExceeded, match=full):
        await sql.prepare("INSERT INTO small VALUES (zeroblob(2000000))").run()


async def test_sql_cuts_its_wal_back_after_a_large_write(tmp_path: Path) -> None:
    sql = Loader(tmp_path, storage_quota_mb=64).sql("acme")
    await sql.exec("CREATE TABLE t (v)")
    insert = sql.prepare("INSERT INTO t VALUES (zeroblob(1000000))")
    await sql.batch([insert] * 12)  # one transaction: a WAL of 12 MB
    wal = tmp_path / "sql" / "acme.sqlite3-wal"
    assert wal.stat().st_size > 12 * 1000 * 1000
    # Checkpointed as it committed; the next write starts the WAL over, cut back to 4 MiB.
    await sql.exec("DELETE FROM t")
    await sql.exec("INSERT INTO t VALUES (1)")
    assert wal.stat().st_size <= 4 * MB


async def cancel_twice(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` as a worker's end does (its session's close, then its stop) and wait."""
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_list_cancelled_twice_still_holds_its_buckets_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = Loader(tmp_path)
    await loader.blobs("acme").put("k", b"v")
    peak = slow_head_reads(monkeypatch, 0.05)
    first = asyncio.ensure_future(loader.blobs("acme").list())
    await asyncio.sleep(0.01)
    await cancel_twice(first)
    await loader.blobs("acme").list()
    assert peak[0] == 1


async def test_a_put_cancelled_twice_while_opening_its_file_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, bucket, root = acme_bucket(tmp_path)
    open_into = _blobs._open_into

    def slow_open(opened: list[Any], path: Path) -> None:
        time.sleep(0.05)
        open_into(opened, path)

    monkeypatch.setattr(_blobs, "_open_into", slow_open)
    put = asyncio.ensure_future(bucket.put("k", b"x" * 1000))
    await asyncio.sleep(0.01)
    await cancel_twice(put)
    await asyncio.sleep(0.1)
    assert list(root.iterdir()) == []
    assert counted(loader, "acme") == 0


async def test_a_commit_whose_directory_sync_fails_has_still_stored_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, bucket, root = acme_bucket(tmp_path)
    await bucket.put("k", b"old")

    def no_descriptor(path: Path) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_blobs, "_fsync_dir", no_descriptor)
    await bucket.put("k", b"new")  # past its commit point: it happened
    monkeypatch.undo()
    found = await bucket.get("k")
    assert found is not None
    assert await found.bytes() == b"new"
    assert unnamed_data_files(bucket, root) == []
    assert counted(loader, "acme") == on_disk_now(root)


async def test_a_commit_that_cannot_read_the_old_head_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, bucket, root = acme_bucket(tmp_path)
    await bucket.put("k", b"old")
    load_head = _blobs._load_head

    def no_descriptor(path: Path, most: int, *, strict: bool = False) -> dict[str, Any] | None:
        if strict:
            raise OSError(errno.EMFILE, "Too many open files")
        return load_head(path, most)

    monkeypatch.setattr(_blobs, "_load_head", no_descriptor)
    with pytest.raises(BindingError, match=r"^the object 'k' could not be stored"):
        await bucket.put("k", b"new")
    with pytest.raises(BindingError, match=r"^the object 'k' could not be deleted"):
        await bucket.delete("k")
    monkeypatch.undo()
    found = await bucket.get("k")
    assert found is not None
    assert await found.bytes() == b"old"
    assert unnamed_data_files(bucket, root) == []
    assert counted(loader, "acme") == on_disk_now(root)


async def test_a_put_past_the_quota_purges_all_the_expired_keys_it_needs(
    tmp_path: Path,
) -> None:
    kv = Loader(tmp_path, storage_quota_mb=1).kv("acme")
    for i in range(900):  # small keys, far more than one purge batch (256)
        await kv.put(f"session-{i}", b"x" * 1000, ttl=1.0)  # none expires while they are put
    await asyncio.sleep(1.1)
    await kv.put("big", b"y" * 500_000)  # needs the room of ~470 of them
    assert await kv.get("big", "bytes") == b"y" * 500_000


def test_a_namespaces_expired_keys_are_found_by_index(tmp_path: Path) -> None:
    loader = Loader(tmp_path)
    conn = loader._stores().kv.conn
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT key FROM kv WHERE namespace = ? AND expires_at <= ?",
        ("acme", 1.0),
    ).fetchall()
    assert "kv_expiring" in str(plan)


async def test_usage_counted_by_another_expression_is_counted_again(tmp_path: Path) -> None:
    await Loader(tmp_path).kv("acme").put("k", "v")
    with sqlite3.connect(tmp_path / "kv.sqlite3") as conn:
        conn.execute("UPDATE usage SET bytes = 5")
        conn.execute("UPDATE usage_counted_by SET expression = 'length(value)'")
    kv = Loader(tmp_path).kv("acme")
    await kv.delete("k")  # by the new expression: back to zero, not below
    with sqlite3.connect(tmp_path / "kv.sqlite3") as conn:
        assert conn.execute("SELECT bytes FROM usage").fetchall() == [(0,)]


async def test_a_call_waiting_for_its_namespaces_turn_ends_at_its_deadline(
    loader: Loader,
) -> None:
    store = loader._stores().kv
    token = call_deadline.set(time.monotonic() + 0.3)
    try:

        def slow(conn: sqlite3.Connection) -> None:
            time.sleep(0.2)

        started = time.monotonic()
        results = await asyncio.gather(
            *(store.run(slow, "acme") for _ in range(5)), return_exceptions=True
        )
    finally:
        call_deadline.reset(token)
    took = time.monotonic() - started
    assert took < 0.6  # not five of them one after another (1 s)
    refused = [r for r in results if isinstance(r, BindingError)]
    assert refused
    assert all("could not start before its deadline" in str(r) for r in refused)


async def test_a_delete_whose_head_cannot_be_removed_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, bucket, root = acme_bucket(tmp_path)
    await bucket.put("k", b"v")
    remove = _blobs._remove

    def refuse_once(path: Path) -> int:
        monkeypatch.setattr(_blobs, "_remove", remove)
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_blobs, "_remove", refuse_once)
    with pytest.raises(BindingError, match=r"^the object 'k' could not be deleted \(Permission"):
        await bucket.delete("k")
    assert (await bucket.head("k") or {})["size"] == 1  # still there, whole
    assert await bucket.delete("k")  # the retry removes it all
    assert list(root.iterdir()) == []
    assert counted(loader, "acme") == 0


async def test_a_delete_whose_data_cannot_be_removed_has_deleted_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, bucket, root = acme_bucket(tmp_path)
    await bucket.put("k", b"v")
    remove = _blobs._remove

    def refuse_data(path: Path) -> int:
        if path.suffix == ".data":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return remove(path)

    monkeypatch.setattr(_blobs, "_remove", refuse_data)
    assert await bucket.delete("k")
    assert await bucket.head("k") is None
    assert counted(loader, "acme") == on_disk_now(root)  # the data left behind still counts


async def test_a_database_with_the_old_expiry_index_gets_the_new_one(tmp_path: Path) -> None:
    await Loader(tmp_path).kv("acme").put("k", "v", ttl=60)
    with sqlite3.connect(tmp_path / "kv.sqlite3") as conn:  # as a version before it made it
        conn.execute("DROP INDEX kv_expiring")
        conn.execute("CREATE INDEX kv_by_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL")
    kv = Loader(tmp_path).kv("acme")
    assert await kv.get("k") == "v"
    with sqlite3.connect(tmp_path / "kv.sqlite3") as conn:
        indexes = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "kv_expiring" in indexes
    assert "kv_by_expiry" not in indexes
