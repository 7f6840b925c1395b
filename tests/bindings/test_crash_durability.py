"""kill -9 of the host in the middle of writes: the databases reopen intact and hold every write
the host had reported as committed (KV and documents, with the search index in step)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from pathlib import Path

from tests._proc import script_with_lines
from workerloader import Loader
from workerloader.bindings import Documents, KvNamespace
from workerloader.bindings._docs import fts_table

WRITER = """
import asyncio, sys
from workerloader import Loader

async def main():
    loader = Loader(sys.argv[1])
    namespace = sys.argv[2]
    kv, db = loader.kv(namespace), loader.db(namespace)
    i = 0
    while True:
        await kv.put(f"k{i:08d}", {"i": i, "pad": "x" * 200})
        await db.create("items", {"id": f"d{i:08d}", "i": i, "text": f"item w{i}"})
        i += 1
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()

asyncio.run(main())
"""


def run_and_kill(data_dir: Path, namespace: str) -> int:
    """Run the writer until it has committed some writes, let it write ~0.5 s more, SIGKILL it;
    the number of writes it reported as committed."""
    with script_with_lines(WRITER, str(data_dir), namespace) as (process, lines):
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        while len(lines) < 20 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read()
        assert len(lines) >= 20, "the writer did not start writing"
        time.sleep(0.5)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    complete = [line for line in lines if line.endswith("\n")]
    assert [int(line) for line in complete] == list(range(1, len(complete) + 1))
    return len(complete)


async def kv_names(kv: KvNamespace) -> list[str]:
    names: list[str] = []
    cursor = None
    while True:
        page = await kv.list(limit=1000, cursor=cursor)
        names += [key["name"] for key in page["keys"]]
        if page["list_complete"]:
            return names
        cursor = page["cursor"]


async def doc_ids(db: Documents) -> list[str]:
    ids: list[str] = []
    while True:
        page = await db.list("items", limit=1000, cursor=ids[-1] if ids else None)
        if not page:
            return ids
        ids += [doc["id"] for doc in page]


def check_integrity(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def count_rows(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert isinstance(count, int)
        return count


async def check_committed(data_dir: Path, namespace: str, committed: int) -> None:
    loader = Loader(data_dir)
    kv, db = loader.kv(namespace), loader.db(namespace)
    keys = await kv_names(kv)
    # Every reported write is there; at most one more (committed, killed before reporting).
    assert keys[:committed] == [f"k{i:08d}" for i in range(committed)]
    assert len(keys) in (committed, committed + 1)
    assert await kv.get(f"k{committed - 1:08d}", type="json") == {
        "i": committed - 1,
        "pad": "x" * 200,
    }
    ids = await doc_ids(db)
    assert ids[:committed] == [f"d{i:08d}" for i in range(committed)]
    assert len(ids) in (committed, committed + 1)
    last = f"d{committed - 1:08d}"
    assert await db.get("items", last) == {
        "id": last,
        "i": committed - 1,
        "text": f"item w{committed - 1}",
    }
    assert [d["id"] for d in await db.search("items", f"w{committed - 1}")] == [last]
    documents = data_dir / "documents.sqlite3"
    assert count_rows(documents, fts_table(namespace)) == len(ids)  # the index is in step


async def test_killing_the_host_mid_write_loses_no_committed_write(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    done: dict[str, int] = {}
    for round_ in range(3):
        namespace = f"crash{round_}"
        done[namespace] = await asyncio.to_thread(run_and_kill, data_dir, namespace)
        for path in (data_dir / "kv.sqlite3", data_dir / "documents.sqlite3"):
            check_integrity(path)
        with contextlib.closing(sqlite3.connect(data_dir / "documents.sqlite3")) as conn:
            for earlier in done:
                index = fts_table(earlier)
                conn.execute(f"INSERT INTO {index} ({index}) VALUES ('integrity-check')")
        for earlier, committed in done.items():  # earlier rounds' writes survive later kills
            assert committed >= 20
            await check_committed(data_dir, earlier, committed)
