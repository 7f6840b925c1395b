"""Blob buckets, host side: put of bytes, str and chunk lists, objects read whole or in chunks,
head, delete, listing with prefix, limit and cursor, keys that look like paths, size limits,
grants, and crash atomicity of overwrites under SIGKILL."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests._proc import script_with_lines
from tests.bindings._helpers import exact
from workerloader import Loader
from workerloader._errors import BindingError, PermissionDenied
from workerloader.bindings import BlobBucket, BlobObject
from workerloader.bindings._blobs import CHUNK_BYTES, MAX_KEY_BYTES, MAX_OBJECT_BYTES

NO_WRITE = r"^this binding may not write this bucket$"
NO_READ = r"^this binding may not read this bucket$"
BAD_KEY = f"a blob key is a non-empty string of at most {MAX_KEY_BYTES} bytes"
MiB = 1 << 20


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture
def bucket(tmp_path: Path) -> BlobBucket:
    return Loader(tmp_path).blobs("b")  # bindings work without entering the Loader


def bucket_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs" / "b"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir())


async def get(bucket: BlobBucket, key: str) -> BlobObject:
    obj = await bucket.get(key)
    assert obj is not None, f"{key!r} is missing"
    return obj


async def read_all(obj: BlobObject) -> bytes:
    """The object's content read in chunks of the largest size allowed."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = await obj.read(offset, CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        assert len(chunk) <= CHUNK_BYTES
        chunks.append(chunk)
        offset += len(chunk)
        assert offset <= 2 * MAX_OBJECT_BYTES


async def keys(bucket: BlobBucket, prefix: str = "") -> list[str]:
    listing = await bucket.list(prefix=prefix)
    assert listing["truncated"] is False
    assert listing["cursor"] is None
    return [head["key"] for head in listing["objects"]]


# ---------------------------------------------------------------------------------------------
# put / get / head / delete


async def test_bytes_round_trip_with_key_size_etag_and_metadata(bucket: BlobBucket) -> None:
    data = bytes(range(256)) * 3
    before = time.time()
    metadata: dict[str, Any] = {"type": "bin", "n": 3}
    head = await bucket.put("img/a.bin", data, metadata=metadata)
    assert head["key"] == "img/a.bin"
    assert head["size"] == len(data)
    assert head["etag"] == md5(data)
    assert head["metadata"] == {"type": "bin", "n": "3"}  # values are kept as strings
    assert before <= head["uploaded"] <= time.time()
    obj = await get(bucket, "img/a.bin")
    assert obj.key == "img/a.bin"
    assert obj.size == len(data)
    assert obj.etag == md5(data)
    assert obj.metadata == {"type": "bin", "n": "3"}
    assert await obj.bytes() == data
    assert await bucket.head("img/a.bin") == head


async def test_a_str_is_stored_as_its_utf8_bytes(bucket: BlobBucket) -> None:
    head = await bucket.put("t", "héllo ☃")
    assert head["size"] == len("héllo ☃".encode())
    obj = await get(bucket, "t")
    assert await obj.bytes() == "héllo ☃".encode()
    assert obj.etag == md5("héllo ☃".encode())
    assert obj.metadata == {}


async def test_a_list_of_chunks_is_stored_as_their_concatenation(bucket: BlobBucket) -> None:
    chunks = [b"first,", b"", b"second,", b"x" * 1000]
    head = await bucket.put("c", chunks)
    whole = b"".join(chunks)
    assert (head["size"], head["etag"]) == (len(whole), md5(whole))
    assert await (await get(bucket, "c")).bytes() == whole


async def test_a_value_that_is_not_bytes_str_or_bytes_chunks_is_refused(
    bucket: BlobBucket, tmp_path: Path
) -> None:
    message = exact("a blob value is bytes, str, or a list of bytes chunks")
    with pytest.raises(BindingError, match=message):
        await bucket.put("k", [b"ok", "not bytes"])  # type: ignore[list-item]
    with pytest.raises(BindingError, match=message):
        await bucket.put("k", [1, 2])  # type: ignore[list-item]
    assert await bucket.get("k") is None
    assert not bucket_dir(tmp_path).exists()


async def test_an_empty_object_exists_and_reads_as_empty(bucket: BlobBucket) -> None:
    await bucket.put("empty", b"")
    obj = await get(bucket, "empty")
    assert (obj.size, obj.etag) == (0, md5(b""))
    assert await obj.bytes() == b""
    assert await obj.read(0, 10) == b""


async def test_put_overwrites_the_object_and_its_metadata(bucket: BlobBucket) -> None:
    await bucket.put("k", b"one", metadata={"v": "1"})
    await bucket.put("k", b"second value")
    obj = await get(bucket, "k")
    assert (obj.size, obj.etag, obj.metadata) == (12, md5(b"second value"), {})
    assert await obj.bytes() == b"second value"
    assert await keys(bucket) == ["k"]


async def test_a_missing_object_is_none_for_get_and_head(bucket: BlobBucket) -> None:
    assert await bucket.get("missing") is None
    assert await bucket.head("missing") is None
    await bucket.put("present", b"x")
    assert await bucket.get("missing") is None
    assert await bucket.head("missing") is None


async def test_delete_removes_the_object_and_says_whether_it_existed(bucket: BlobBucket) -> None:
    await bucket.put("k", b"v")
    await bucket.put("other", b"w")
    assert await bucket.delete("k") is True
    assert await bucket.get("k") is None
    assert await bucket.head("k") is None
    assert await bucket.delete("k") is False
    assert await bucket.delete("never") is False
    assert await keys(bucket) == ["other"]
    assert await (await get(bucket, "other")).bytes() == b"w"


# ---------------------------------------------------------------------------------------------
# Reading


async def test_a_one_mib_object_reads_back_in_chunks(bucket: BlobBucket) -> None:
    data = random.Random(7).randbytes(MiB)
    await bucket.put("big", data)
    obj = await get(bucket, "big")
    assert obj.size == MiB
    assert obj.etag == md5(data)
    assert await read_all(obj) == data
    # Unaligned chunks reassemble too, and reads past the end are short or empty.
    parts, offset = [], 0
    while offset < MiB:
        parts.append(await obj.read(offset, 100_003))
        offset += 100_003
    assert b"".join(parts) == data
    assert await obj.read(MiB - 5, 100) == data[-5:]
    assert await obj.read(MiB, 100) == b""
    assert await obj.read(MiB + 1000, 100) == b""


async def test_bytes_reads_objects_up_to_one_chunk_and_refuses_larger_ones(
    bucket: BlobBucket,
) -> None:
    await bucket.put("fits", b"a" * CHUNK_BYTES)
    assert await (await get(bucket, "fits")).bytes() == b"a" * CHUNK_BYTES
    await bucket.put("over", b"b" * (CHUNK_BYTES + 1))
    obj = await get(bucket, "over")
    with pytest.raises(
        BindingError,
        match=exact(
            f"object of {CHUNK_BYTES + 1} bytes: read it in chunks with read(offset, length)"
        ),
    ):
        await obj.bytes()
    assert await read_all(obj) == b"b" * (CHUNK_BYTES + 1)


@pytest.mark.parametrize("change", ["overwrite", "delete"])
async def test_an_object_being_read_in_chunks_stays_the_object_that_was_got(
    bucket: BlobBucket, tmp_path: Path, change: str
) -> None:
    # A BlobObject is the object as it was when got: reading on after the key is overwritten
    # or deleted gives the rest of that object, or a BindingError (never a mix of two objects,
    # nor an OSError naming the host's files).
    old = b"o" * (3 * CHUNK_BYTES)
    await bucket.put("k", old)
    obj = await get(bucket, "k")
    first = await obj.read(0, CHUNK_BYTES)
    if change == "overwrite":
        await bucket.put("k", b"n" * (3 * CHUNK_BYTES))
    else:
        await bucket.delete("k")
    outcome: bytes | BindingError
    try:
        outcome = await obj.read(CHUNK_BYTES, CHUNK_BYTES)
    except BindingError as exc:
        outcome = exc
    if isinstance(outcome, BindingError):
        assert str(tmp_path) not in str(outcome)
    else:
        assert first + outcome == old[: 2 * CHUNK_BYTES]


@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, 0), (0, -5), (0, CHUNK_BYTES + 1)])
async def test_a_read_outside_the_bounds_is_a_binding_error(
    bucket: BlobBucket, offset: int, length: int
) -> None:
    await bucket.put("k", b"0123456789")
    obj = await get(bucket, "k")
    with pytest.raises(
        BindingError,
        match=exact(f"read at most {CHUNK_BYTES} bytes from a non-negative offset"),
    ):
        await obj.read(offset, length)


# ---------------------------------------------------------------------------------------------
# list


async def test_list_with_a_prefix_returns_exactly_the_keys_that_start_with_it(
    bucket: BlobBucket,
) -> None:
    all_keys = ["img/2.png", "img/1.png", "imgs", "im", "doc/a", "img/", "img0", "IMG/x"]
    for key in all_keys:
        await bucket.put(key, key.encode(), metadata={"k": key})
    assert await keys(bucket, "img/") == ["img/", "img/1.png", "img/2.png"]
    assert await keys(bucket, "img") == ["img/", "img/1.png", "img/2.png", "img0", "imgs"]
    assert await keys(bucket, "nope") == []
    assert await keys(bucket) == sorted(all_keys)
    listing = await bucket.list(prefix="doc/")
    (head,) = listing["objects"]
    assert head == await bucket.head("doc/a")
    assert (head["size"], head["etag"], head["metadata"]) == (5, md5(b"doc/a"), {"k": "doc/a"})


async def pages(bucket: BlobBucket, prefix: str, limit: int) -> list[dict[str, Any]]:
    result, cursor = [], None
    while True:
        page = await bucket.list(prefix=prefix, limit=limit, cursor=cursor)
        result.append(page)
        if not page["truncated"]:
            return result
        cursor = page["cursor"]
        assert isinstance(cursor, str)
        assert len(result) < 100


@pytest.mark.parametrize("prefix", ["", "k"])
async def test_cursor_paging_yields_disjoint_ordered_pages_covering_every_key(
    bucket: BlobBucket, prefix: str
) -> None:
    all_keys = [f"k{i:02d}" for i in range(25)]
    for key in reversed(all_keys):
        await bucket.put(key, key)
    if prefix:
        for other in ("j99", "l00", "K00"):
            await bucket.put(other, b"outside the prefix")
    result = await pages(bucket, prefix, 10)
    page_keys = [[head["key"] for head in page["objects"]] for page in result]
    assert [len(p) for p in page_keys] == [10, 10, 5]
    assert [p["truncated"] for p in result] == [True, True, False]
    assert [p["cursor"] for p in result] == [page_keys[0][-1], page_keys[1][-1], None]
    flat = [key for page in page_keys for key in page]
    assert flat == all_keys
    assert len(set(flat)) == len(flat)


async def test_a_page_that_exactly_fills_the_limit_is_the_last_only_if_nothing_follows(
    bucket: BlobBucket,
) -> None:
    for i in range(20):
        await bucket.put(f"k{i:02d}", b"v")
    result = await pages(bucket, "", 10)
    assert [len(p["objects"]) for p in result] == [10, 10]
    assert [p["truncated"] for p in result] == [True, False]


async def test_list_of_a_bucket_never_written_is_empty(bucket: BlobBucket, tmp_path: Path) -> None:
    assert await bucket.list() == {"objects": [], "truncated": False, "cursor": None}
    assert not bucket_dir(tmp_path).exists()


@pytest.mark.parametrize("limit", [0, -1, 1001])
async def test_a_limit_outside_1_to_1000_is_a_binding_error(bucket: BlobBucket, limit: int) -> None:
    with pytest.raises(BindingError, match=r"^limit must be between 1 and 1000$"):
        await bucket.list(limit=limit)


# ---------------------------------------------------------------------------------------------
# Keys


PATH_LIKE_KEYS = [
    "../../etc/passwd",
    "../outside",
    "a/b",
    "a/../../b",
    "/abs",
    "/etc/passwd",
    "..",
    ".",
    "a\x00b",
    "C:\\windows\\x",
    "~/x",
]


async def test_keys_that_look_like_paths_stay_inside_the_bucket_directory(
    bucket: BlobBucket, tmp_path: Path
) -> None:
    for key in PATH_LIKE_KEYS:
        await bucket.put(key, f"value of {key}", metadata={"key": key})
    root = bucket_dir(tmp_path)
    everything = files_under(tmp_path)
    outside = [p for p in everything if root not in p.parents]
    assert outside == []
    assert {p.parent for p in everything} == {root}
    # File names carry no key material: hex digits and an extension only.
    assert all(re.fullmatch(r"[0-9a-f]{16,}\.[a-z]+", p.name) for p in everything), everything
    assert await keys(bucket) == sorted(PATH_LIKE_KEYS)
    for key in PATH_LIKE_KEYS:
        obj = await get(bucket, key)
        assert (obj.key, obj.metadata) == (key, {"key": key})
        assert await obj.bytes() == f"value of {key}".encode()
    assert await keys(bucket, "../") == ["../../etc/passwd", "../outside"]
    for key in PATH_LIKE_KEYS:
        assert await bucket.delete(key) is True
    assert files_under(tmp_path) == []


async def test_buckets_do_not_see_each_others_objects(tmp_path: Path) -> None:
    loader = Loader(tmp_path)
    a, ab = loader.blobs("a"), loader.blobs("ab")
    await a.put("bx", b"a's")
    await ab.put("x", b"ab's")
    assert await keys(a) == ["bx"]
    assert await keys(ab) == ["x"]
    assert await a.get("x") is None
    assert await ab.get("bx") is None
    assert await ab.delete("bx") is False
    assert await (await get(a, "bx")).bytes() == b"a's"


@pytest.mark.parametrize("name", ["", "a/b", "../x", "a..b", ".hidden", "/abs"])
def test_an_invalid_bucket_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid namespace or name "):
        Loader(tmp_path).blobs(name)


async def test_keys_up_to_the_byte_limit_are_accepted_and_others_refused(
    bucket: BlobBucket,
) -> None:
    longest = "k" * MAX_KEY_BYTES
    await bucket.put(longest, b"v")
    assert await (await get(bucket, longest)).bytes() == b"v"
    for key in ("k" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2 + 1), ""):
        with pytest.raises(BindingError, match=exact(BAD_KEY)):
            await bucket.put(key, b"v")
        with pytest.raises(BindingError, match=exact(BAD_KEY)):
            await bucket.get(key)
        with pytest.raises(BindingError, match=exact(BAD_KEY)):
            await bucket.head(key)
        with pytest.raises(BindingError, match=exact(BAD_KEY)):
            await bucket.delete(key)
    with pytest.raises(BindingError, match=exact(BAD_KEY)):
        await bucket.put(7, b"v")  # type: ignore[arg-type]
    assert await keys(bucket) == [longest]


# ---------------------------------------------------------------------------------------------
# Size limit


async def test_an_object_of_exactly_the_limit_is_stored(bucket: BlobBucket) -> None:
    head = await bucket.put("max", [b"m" * (MAX_OBJECT_BYTES - 1), b"!"])
    assert head["size"] == MAX_OBJECT_BYTES
    obj = await get(bucket, "max")
    assert obj.size == MAX_OBJECT_BYTES
    assert await obj.read(MAX_OBJECT_BYTES - 3, 10) == b"mm!"


async def test_an_object_over_the_limit_is_refused_before_anything_is_written(
    bucket: BlobBucket, tmp_path: Path
) -> None:
    too_big = exact(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
    with pytest.raises(BindingError, match=too_big):
        await bucket.put("k", [b"x" * MAX_OBJECT_BYTES, b"y"])
    assert not bucket_dir(tmp_path).exists()  # not even the bucket's directory

    await bucket.put("k", b"kept", metadata={"v": "1"})
    files_before = sorted(bucket_dir(tmp_path).iterdir())
    with pytest.raises(BindingError, match=too_big):
        await bucket.put("k", b"x" * (MAX_OBJECT_BYTES + 1))
    with pytest.raises(BindingError, match=too_big):
        await bucket.put("k", "é" * (MAX_OBJECT_BYTES // 2 + 1))  # counted in bytes
    with pytest.raises(BindingError, match=too_big):
        await bucket.put("other", [b"x" * (MAX_OBJECT_BYTES // 2)] * 3)
    assert sorted(bucket_dir(tmp_path).iterdir()) == files_before
    obj = await get(bucket, "k")
    assert (await obj.bytes(), obj.metadata) == (b"kept", {"v": "1"})
    assert await keys(bucket) == ["k"]


# ---------------------------------------------------------------------------------------------
# Grants


async def test_a_read_only_bucket_reads_but_cannot_put_or_delete(tmp_path: Path) -> None:
    loader = Loader(tmp_path)
    await loader.blobs("b").put("k", b"v")
    ro = loader.blobs("b", write=False)
    assert await (await get(ro, "k")).bytes() == b"v"
    assert (await ro.head("k") or {}).get("size") == 1
    assert await keys(ro) == ["k"]
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.put("k", b"changed")
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.put("new", b"v")
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.delete("k")
    assert await keys(ro) == ["k"]
    assert await (await get(ro, "k")).bytes() == b"v"


async def test_a_write_only_bucket_writes_but_cannot_get_head_or_list(tmp_path: Path) -> None:
    loader = Loader(tmp_path)
    wo = loader.blobs("b", read=False)
    await wo.put("k", b"v")
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.get("k")
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.head("k")
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.list()
    assert await (await get(loader.blobs("b"), "k")).bytes() == b"v"
    assert await wo.delete("k") is True
    assert await loader.blobs("b").get("k") is None


async def test_grants_are_checked_before_the_arguments(tmp_path: Path) -> None:
    none = Loader(tmp_path).blobs("b", read=False, write=False)
    with pytest.raises(PermissionError, match=NO_WRITE):
        await none.put("k", b"x" * (MAX_OBJECT_BYTES + 1))
    with pytest.raises(PermissionError, match=NO_READ):
        await none.get("")
    with pytest.raises(PermissionError, match=NO_READ):
        await none.list(limit=0)
    assert not bucket_dir(tmp_path).exists()


# ---------------------------------------------------------------------------------------------
# Crash atomicity


ROUND_BYTES = 4 * MiB

# Overwrites one key with a new 4 MiB payload every round: the bytes of round i are all
# i % 251 and there are ROUND_BYTES + i of them (content and size both identify the round).
OVERWRITER = """
import asyncio, sys
from workerloader import Loader

async def main():
    bucket = Loader(sys.argv[1]).blobs("b")
    size = int(sys.argv[2])
    i = 0
    while True:
        print(f"start {i}", flush=True)
        await bucket.put("k", bytes([i % 251]) * (size + i), metadata={"round": str(i)})
        print(f"done {i}", flush=True)
        i += 1

asyncio.run(main())
"""

# Runs a fixed sequence of operations on one key and dies by SIGKILL just before the n-th
# file-system step (argv[2]: replace, rename, unlink, remove or fsync), whatever the
# implementation's steps are; n = 0 never dies and reports how many steps there were.
CRASH_AT_STEP = """
import asyncio, os, signal, sys
from workerloader import Loader

target = int(sys.argv[2])
steps = 0

def crashing(real):
    def step(*args, **kwargs):
        global steps
        steps += 1
        if steps == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return step

for name in ("replace", "rename", "unlink", "remove", "fsync"):
    setattr(os, name, crashing(getattr(os, name)))

OPS = [("put", b"one" * 1000), ("put", b"two!" * 2000), ("delete", None),
       ("put", b"three" * 3000), ("put", b"four" * 100)]

async def main():
    bucket = Loader(sys.argv[1]).blobs("b")
    for i, (op, value) in enumerate(OPS):
        print(f"start {i}", flush=True)
        if op == "put":
            await bucket.put("k", value, metadata={"op": str(i)})
        else:
            await bucket.delete("k")
        print(f"done {i}", flush=True)
    print(f"steps {steps}", flush=True)

asyncio.run(main())
"""
# The object after each operation of CRASH_AT_STEP (None: absent).
STATES: list[bytes | None] = [b"one" * 1000, b"two!" * 2000, None, b"three" * 3000, b"four" * 100]


def run_overwriter_and_kill(data_dir: Path, rng: random.Random) -> tuple[int, int]:
    """Run the overwriter until one put has completed, SIGKILL it 0.3–0.6 s after it started;
    the last round it had completed and the last it had started."""
    with script_with_lines(OVERWRITER, str(data_dir), str(ROUND_BYTES)) as (process, lines):
        assert process.stderr is not None
        started = time.monotonic()
        deadline = started + 30
        while "done 0\n" not in lines and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, process.stderr.read()
        assert "done 0\n" in lines, "the overwriter did not complete a put"
        time.sleep(max(0.0, started + rng.uniform(0.3, 0.6) - time.monotonic()))
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    done = [int(line.split()[1]) for line in lines if line.startswith("done ")]
    begun = [int(line.split()[1]) for line in lines if line.startswith("start ")]
    assert done == list(range(len(done)))
    return done[-1], begun[-1]


async def check_object(bucket: BlobBucket, obj: BlobObject) -> tuple[int, bytes]:
    """The round an object's content belongs to, checking it is whole and matches its head."""
    data = await read_all(obj)
    assert obj.key == "k"
    assert obj.size == len(data)
    assert obj.etag == md5(data)
    assert len(data) >= ROUND_BYTES
    round_ = len(data) - ROUND_BYTES
    assert data == bytes([round_ % 251]) * len(data)
    assert obj.metadata == {"round": str(round_)}
    head = await bucket.head("k")
    assert head is not None
    assert (head["size"], head["etag"], head["metadata"]) == (obj.size, obj.etag, obj.metadata)
    return round_, data


async def test_an_overwrite_killed_at_a_random_moment_leaves_one_whole_payload(
    tmp_path: Path,
) -> None:
    rng = random.Random()
    for attempt in range(3):
        data_dir = tmp_path / f"attempt{attempt}"
        last_done, last_started = run_overwriter_and_kill(data_dir, rng)
        bucket = Loader(data_dir).blobs("b")
        # A put never removes the object: after one has completed, the object always exists.
        obj = await get(bucket, "k")
        round_, _ = await check_object(bucket, obj)
        assert last_done <= round_ <= last_started
        listing = await bucket.list()
        assert [head["key"] for head in listing["objects"]] == ["k"]
        # The bucket still works: a new put replaces whatever the crash left.
        await bucket.put("k", b"after the crash")
        assert await (await get(bucket, "k")).bytes() == b"after the crash"
        assert await keys(bucket) == ["k"]


def run_crashing_at_step(data_dir: Path, n: int) -> list[str]:
    process = subprocess.run(
        [sys.executable, "-c", CRASH_AT_STEP, str(data_dir), str(n)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert process.returncode == (-signal.SIGKILL if n else 0), process.stderr
    return process.stdout.splitlines()


async def crash_outcome(data_dir: Path, n: int) -> str | None:
    """Crash the sequence before step n; what is wrong with what it left (None: nothing)."""
    lines = run_crashing_at_step(data_dir, n)
    done = [int(line.split()[1]) for line in lines if line.startswith("done ")]
    last_done = done[-1] if done else -1
    # Killed during operation last_done + 1: the object is as that operation left it, or as
    # the one before it did.
    allowed = {last_done, last_done + 1}
    expected = {i: (None if i < 0 else STATES[i]) for i in allowed if i < len(STATES)}
    bucket = Loader(data_dir).blobs("b")
    obj = await bucket.get("k")
    listing = await bucket.list()
    listed = [head["key"] for head in listing["objects"]]
    if obj is None:
        if None not in expected.values():
            return f"the object is absent; expected one of operations {sorted(expected)}"
        if listed != [] or await bucket.head("k") is not None:
            return f"get says absent but list says {listed}"
        return None
    data = await read_all(obj)
    matching = [i for i, state in expected.items() if state == data]
    if not matching:
        return f"content of {len(data)} bytes is none of operations {sorted(expected)}"
    if (obj.size, obj.etag, obj.metadata) != (len(data), md5(data), {"op": str(matching[0])}):
        return (
            f"the head (size {obj.size}, etag {obj.etag}, metadata {obj.metadata}) does not "
            f"describe the content (size {len(data)}, etag {md5(data)}, op {matching[0]})"
        )
    if listed != ["k"]:
        return f"list shows {listed}"
    return None


async def test_a_crash_at_any_step_leaves_the_old_object_or_the_new_never_a_mix(
    tmp_path: Path,
) -> None:
    lines = run_crashing_at_step(tmp_path / "complete", 0)
    assert lines[-1].startswith("steps ")
    total = int(lines[-1].split()[1])
    assert total >= len(STATES)  # every operation has at least one step to crash before
    problems = {}
    for n in range(1, total + 1):
        problem = await crash_outcome(tmp_path / f"crash{n}", n)
        if problem is not None:
            problems[n] = problem
    assert problems == {}
    # A bucket a crash left behind keeps working.
    bucket = Loader(tmp_path / f"crash{total}").blobs("b")
    await bucket.put("k", b"after")
    await bucket.put("other", b"x")
    assert await (await get(bucket, "k")).bytes() == b"after"
    assert await keys(bucket) == ["k", "other"]


async def test_a_large_object_is_put_by_pulling_chunks_from_the_caller(
    bucket: BlobBucket,
) -> None:
    """Objects bigger than one call can carry: the host pulls chunks from an async function
    (from a worker it crosses as a stub) until it returns b""."""
    parts = [bytes([i]) * (256 * 1024) for i in range(12)]  # 3 MiB, over one RPC frame
    pending = list(parts)

    async def next_chunk() -> bytes:
        return pending.pop(0) if pending else b""

    head = await bucket.put("big", next_chunk)
    assert head["size"] == 3 * 1024 * 1024
    obj = await bucket.get("big")
    assert obj is not None
    got = b"".join([await obj.read(i * CHUNK_BYTES, CHUNK_BYTES) for i in range(12)])
    assert got == b"".join(parts)


async def test_a_pulled_object_over_the_limit_leaves_nothing(
    bucket: BlobBucket, tmp_path: Path
) -> None:
    await bucket.put("k", b"old")

    async def endless() -> bytes:
        return b"x" * (1 << 20)

    with pytest.raises(
        BindingError, match=exact(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
    ):
        await bucket.put("k", endless)
    obj = await bucket.get("k")
    assert obj is not None
    assert await obj.bytes() == b"old"
    assert len(list(bucket_dir(tmp_path).glob("*.data"))) == 1
