"""Blobs: R2-like buckets of objects, written atomically.

An object is a data file with a name of its own (never reused) and a small head file, named by
a hash of the key, that says which data file is current (with size, etag and metadata). A put
writes and fsyncs the new data file, then replaces the head atomically (write, fsync, rename,
fsync the directory), then removes the old data file. After a crash the head names either the
old complete data or the new complete data, never a partial object. No key can name a path:
files are named by hashes and random ids; the key itself lives in the head.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import heapq
import json
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Final

from .._errors import BindingError
from ..rpc import RpcTarget
from ._kv import page_limit, utf8_length
from ._quota import BucketUsage, on_disk
from ._sqlite import Grants, check_grant
from ._tasks import holding, to_the_end

__all__ = ["BlobBucket"]

MAX_OBJECT_BYTES: Final = 64 << 20
CHUNK_BYTES: Final = 256 * 1024
MAX_KEY_BYTES: Final = 1024
MAX_METADATA_BYTES: Final = 8 * 1024
"""An object's metadata as JSON (ASCII, so characters are bytes)."""
MAX_HEAD_BYTES: Final = 16 * 1024
"""The most ``list`` reads of one head file: a key (at most 6 KiB escaped), the metadata and a
few fields. A head over it (metadata stored before ``MAX_METADATA_BYTES``) is not listed."""
MAX_LEGACY_HEAD_BYTES: Final = 8 << 20
"""The most ``get`` and ``head`` read of one head file: over anything a put could ever write
(one RPC message carries 4 MiB)."""
MAX_PAGE_BYTES: Final = 2 << 20
"""The heads one ``list`` returns, as stored: a fuller page stops early (truncated, with a
cursor), so it always fits one RPC message (4 MiB)."""
CHUNK_TIMEOUT_S: Final = 30.0
"""How long ``put`` waits for each chunk from a chunk function."""
MAX_OPEN_PUTS: Final = 16
"""Puts one bucket object runs at once (each with at most one data file and one chunk in
memory); further puts wait for one to finish."""
_NOT_BYTES: Final = "a blob value is bytes, str, or a list of bytes chunks"
_BAD_METADATA: Final = "metadata is a dict of string keys to string values"


def _key(key: object) -> str:
    if not isinstance(key, str) or not key or utf8_length(key, "a blob key") > MAX_KEY_BYTES:
        raise BindingError(f"a blob key is a non-empty string of at most {MAX_KEY_BYTES} bytes")
    return key


def _bound(value: object, what: str) -> str:
    """A list prefix or cursor: a string no longer than a key."""
    if not isinstance(value, str) or utf8_length(value, what) > MAX_KEY_BYTES:
        raise BindingError(f"{what} is a string of at most {MAX_KEY_BYTES} bytes")
    return value


def _metadata(metadata: object) -> dict[str, str]:
    """``metadata`` with its values as strings; BindingError unless it is a dict of str keys
    to scalar values of at most ``MAX_METADATA_BYTES`` as JSON."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise BindingError(_BAD_METADATA)
    meta: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, (str, int, float, bool)):
            raise BindingError(_BAD_METADATA)
        meta[name] = str(value)
    if len(json.dumps(meta)) > MAX_METADATA_BYTES:
        raise BindingError(f"metadata may be at most {MAX_METADATA_BYTES} bytes as JSON")
    return meta


async def _each(chunks: list[bytes]) -> AsyncGenerator[bytes]:
    for chunk in chunks:
        yield chunk


async def _pull(source: Callable[[], Awaitable[bytes | None]]) -> AsyncGenerator[bytes]:
    """The chunks ``source`` gives until it gives b"" or None; BindingError if one takes
    longer than ``CHUNK_TIMEOUT_S``."""
    while True:
        try:
            async with asyncio.timeout(CHUNK_TIMEOUT_S):
                chunk = await source()
        except TimeoutError:
            raise BindingError(
                f"the chunk function gave no chunk for {CHUNK_TIMEOUT_S:g} s; nothing was stored"
            ) from None
        if not chunk:
            return
        yield chunk


def _flush_and_sync(f: IO[Any]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _public(head: dict[str, Any]) -> dict[str, Any]:
    """A head as callers see it (without the internal data file name)."""
    return {k: v for k, v in head.items() if k != "data"}


def _open_into(opened: list[IO[bytes]], path: Path) -> None:
    """Open ``path`` for writing into ``opened`` (the caller closes it)."""
    opened.append(open(path, "wb"))  # noqa: SIM115 - the caller closes it, whatever happens


def _close_and_remove(opened: list[IO[bytes]], path: Path) -> None:
    """Clean up after a failed put (so raising nothing: the put's own error is the one to
    tell)."""
    for f in opened:
        with contextlib.suppress(OSError):
            f.close()
    _discard(path)


def _not_stored(key: str, exc: OSError) -> BindingError:
    """What a put the host's file system failed is told: what happened, never the host's
    path."""
    why = exc.strerror or "an I/O error"
    return BindingError(f"the object {key!r} could not be stored ({why}); nothing was stored")


def _discard(path: Path) -> None:
    """Remove the file at ``path`` in cleanup after a failure: a file that cannot be removed
    (a read-only remount) stays, and the failure being handled is the one told."""
    with contextlib.suppress(OSError):
        path.unlink()


def _counted(path: Path) -> int:
    """What the file at ``path`` counts toward the bucket's quota; 0 if there is none."""
    try:
        return on_disk(path.stat().st_size)
    except OSError:
        return 0


def _remove(path: Path) -> int:
    """Remove the file at ``path`` if it is there; what that gave back to the quota."""
    counted = _counted(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return counted


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_head(path: Path, most: int, *, strict: bool = False) -> dict[str, Any] | None:
    """The head stored at ``path``, reading at most ``most`` bytes of it; None if it is missing,
    larger, or not a head. ``strict``: an OSError other than its absence is raised (one that
    is not there for now, as no descriptor being left, must not pass for "no head")."""
    try:
        with open(path, "rb") as f:
            raw = f.read(most + 1)
        if len(raw) > most:
            return None
        head = json.loads(raw)
    except FileNotFoundError:
        return None
    except OSError:
        if strict:
            raise
        return None
    except (ValueError, RecursionError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("key"), str):
        return None
    return head


class BlobObject(RpcTarget):
    """A stored object: ``key``, ``size``, ``metadata``, ``etag``; read it with ``bytes()`` or
    in chunks with ``read(offset, length)``."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self._path = path
        self._head = head

    @property
    def key(self) -> str:
        return str(self._head["key"])

    @property
    def size(self) -> int:
        return int(self._head["size"])

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._head["metadata"])

    @property
    def etag(self) -> str:
        return str(self._head["etag"])

    async def read(self, offset: int = 0, length: int = CHUNK_BYTES) -> builtins.bytes:
        """Up to ``length`` (at most 256 KiB) bytes from ``offset``; b"" at the end."""
        if (
            isinstance(offset, bool)
            or isinstance(length, bool)
            or not isinstance(offset, int)
            or not isinstance(length, int)
            or not 0 <= offset < 1 << 62  # f.seek refuses past it (ValueError)
            or not 0 < length <= CHUNK_BYTES
        ):
            raise BindingError(f"read at most {CHUNK_BYTES} bytes from a non-negative offset")

        def work() -> builtins.bytes:
            with open(self._path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        try:
            return await asyncio.to_thread(work)
        except OSError:
            # Never the host's path: say what happened and what to do.
            raise BindingError(
                f"the object {self.key!r} was replaced or deleted while it was being read; "
                "get it again"
            ) from None

    async def bytes(self) -> builtins.bytes:
        """The whole object (objects over 256 KiB: use ``read`` in chunks)."""
        if self.size > CHUNK_BYTES:
            raise BindingError(
                f"object of {self.size} bytes: read it in chunks with read(offset, length)"
            )
        return await self.read(0, max(self.size, 1))


class BlobBucket(RpcTarget):
    """One bucket: ``put``, ``get``, ``head``, ``delete``, ``list``. Every argument is checked
    here, at the binding's boundary: a bad one is BindingError, never a Python error from inside
    the host."""

    def __init__(self, root: Path, grants: Grants, usage: BucketUsage | None = None) -> None:
        """The bucket stored in directory ``root``. ``usage`` counts its bytes against a
        quota; share one among every BlobBucket on the same directory (the Loader does). None:
        a count of this object's own, with no quota."""
        self._root = root
        self._grants = grants
        self._writers = asyncio.Semaphore(MAX_OPEN_PUTS)
        self._usage = usage or BucketUsage(root, None, f"the bucket {root.name!r}")

    def _head_path(self, key: str) -> Path:
        return self._root / (hashlib.sha256(key.encode()).hexdigest() + ".head")

    async def put(
        self,
        key: str,
        value: bytes | str | Iterable[bytes] | Callable[[], Awaitable[bytes | None]],
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Store ``value`` under ``key``, atomically; returns the new object's head.

        ``value`` is bytes, str, a list of byte chunks, or, for objects larger than one call
        can carry, an async function the host calls for the next chunk until it returns
        ``b""`` or None (from a worker: pass the function itself, it crosses as a stub). Each
        call must answer within ``CHUNK_TIMEOUT_S``. ``metadata`` is at most
        ``MAX_METADATA_BYTES`` as JSON. A bucket object writes at most ``MAX_OPEN_PUTS``
        objects at once, and opens a data file only once there is a chunk to write to it.
        """
        check_grant(self._grants, "write", "this bucket")
        key = _key(key)
        meta = _metadata(metadata)
        if callable(value):
            chunks = _pull(value)
        else:
            # A value whose size is known up front is checked before anything is written.
            if isinstance(value, str):
                try:
                    value = value.encode()
                except UnicodeEncodeError:
                    raise BindingError("a str blob value is not valid Unicode text") from None
            if isinstance(value, bytes):
                items: list[object] = [value]
            elif isinstance(value, Iterable):
                items = list(value)
            else:
                raise BindingError(_NOT_BYTES)
            given = [c for c in items if isinstance(c, bytes)]
            if len(given) != len(items):
                raise BindingError(_NOT_BYTES)
            if sum(len(c) for c in given) > MAX_OBJECT_BYTES:
                raise BindingError(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
            chunks = _each(given)
        # The slot is taken before the first chunk is asked for: a put holds at most one chunk
        # in the host's memory, so waiting puts hold none. A source that never answers holds a
        # slot (until CHUNK_TIMEOUT_S), never a file: the file is opened with the first chunk.
        async with self._writers, contextlib.aclosing(chunks):
            first = await anext(chunks, None)
            head = await self._write(key, meta, first, chunks)
        # From here the put runs to its end even if its caller goes: a commit cut short would
        # leave a data file no head names, and the bucket's count wrong.
        return await to_the_end(self._commit_put(key, head))

    async def _commit_put(self, key: str, head: dict[str, Any]) -> dict[str, Any]:
        """Make ``head`` (its data written and counted) the key's, under the key's lock; on
        any failure remove its data and give its count back."""
        data_path, size = self._root / head["data"], head["size"]
        text = json.dumps(head)
        # The chunks reserved their bytes; the files take whole blocks (see _quota).
        rest = on_disk(len(text)) + on_disk(size) - size
        try:
            await self._usage.reserve(rest)
        except BaseException:
            self._usage.release(size)
            await asyncio.to_thread(_discard, data_path)
            raise
        try:
            async with self._usage.key_locks.of(key):
                freed = await asyncio.to_thread(self._commit, key, text)
        except BaseException as exc:
            self._usage.release(size + rest)
            await asyncio.to_thread(_discard, data_path)
            if isinstance(exc, OSError):
                raise _not_stored(key, exc) from None
            raise
        self._usage.release(freed)
        return _public(head)

    async def _write(
        self,
        key: str,
        meta: dict[str, str],
        first: builtins.bytes | None,
        rest: AsyncIterator[builtins.bytes],
    ) -> dict[str, Any]:
        """Write ``first`` and ``rest`` to a new data file, synced; the head that names it."""
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        await self._usage.used()  # counted first: the count must not see this put's own file
        data_path = self._root / f"{uuid.uuid4().hex}.data"  # never reused: old heads stay valid
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        opened: list[IO[bytes]] = []  # kept by the thread that opens it: a cancel loses none
        try:
            # Each file operation ends before the put does (cancelled, it waits for it): the
            # file is then closed and removed, never written behind its back.
            await to_the_end(asyncio.to_thread(_open_into, opened, data_path))
            f = opened[0]
            chunk = first
            while chunk is not None:
                if not isinstance(chunk, builtins.bytes):
                    raise BindingError(_NOT_BYTES)
                if size + len(chunk) > MAX_OBJECT_BYTES:
                    raise BindingError(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
                await self._usage.reserve(len(chunk))  # before the bytes reach the disk
                size += len(chunk)
                digest.update(chunk)
                await to_the_end(asyncio.to_thread(f.write, chunk))
                chunk = await anext(rest, None)
            await to_the_end(asyncio.to_thread(_flush_and_sync, f))
        except BaseException as exc:
            self._usage.release(size)
            await to_the_end(asyncio.to_thread(_close_and_remove, opened, data_path))
            if isinstance(exc, OSError):
                raise _not_stored(key, exc) from None
            raise
        f.close()
        return {
            "key": key,
            "size": size,
            "etag": digest.hexdigest(),
            "metadata": meta,
            "uploaded": time.time(),
            "data": data_path.name,
        }

    def _commit(self, key: str, head: str) -> int:
        """Point the key's head at the new data (the commit point), then drop the old data;
        what the old head and data counted, now gone. Hold the key's lock: the old ones are
        then this commit's alone to remove and give back. OSError before the commit point
        leaves no new file and the old ones as they were; after it, the put has happened (a
        failed directory sync or removal of the old data is not its failure: an old file not
        removed stays counted)."""
        previous = self._read_head(key, strict=True)
        head_path = self._head_path(key)
        freed = _counted(head_path)
        head_tmp = self._root / f"{uuid.uuid4().hex}.tmp"
        try:
            with open(head_tmp, "w") as f:
                f.write(head)
                _flush_and_sync(f)
            os.replace(head_tmp, head_path)  # the commit point
        except OSError:
            _discard(head_tmp)
            raise
        with contextlib.suppress(OSError):
            _fsync_dir(self._root)
        if previous is not None:
            with contextlib.suppress(OSError):
                freed += _remove(previous[0])
        return freed

    def _read_head(self, key: str, strict: bool = False) -> tuple[Path, dict[str, Any]] | None:
        """The data file and head of ``key`` (a checked key), or None (blocking I/O; for
        ``strict`` see ``_load_head``)."""
        head = _load_head(self._head_path(key), MAX_LEGACY_HEAD_BYTES, strict=strict)
        if head is None:
            return None
        data = self._root / str(head.get("data", ""))
        if head["key"] != key or data.parent != self._root or not data.is_file():
            return None
        return data, head

    async def head(self, key: str) -> dict[str, Any] | None:
        """The object's head (key, size, etag, metadata, uploaded), or None."""
        check_grant(self._grants, "read", "this bucket")
        found = await asyncio.to_thread(self._read_head, _key(key))
        return None if found is None else _public(found[1])

    async def get(self, key: str) -> BlobObject | None:
        """The object, to read whole or in chunks; None if absent."""
        check_grant(self._grants, "read", "this bucket")
        found = await asyncio.to_thread(self._read_head, _key(key))
        return None if found is None else BlobObject(*found)

    async def delete(self, key: str) -> bool:
        """Remove the object; True if it existed."""
        check_grant(self._grants, "write", "this bucket")
        key = _key(key)

        freed = 0  # counted as the files go, so a removal that fails midway gives back its part

        def work() -> bool:
            nonlocal freed
            found = self._read_head(key, strict=True)  # its data file is known, or it raises
            freed += _remove(self._head_path(key))  # the delete's commit point
            if found is not None:
                # Gone for every reader now: data that cannot be removed (a read-only
                # remount) stays, counted, rather than the delete be told it failed.
                with contextlib.suppress(OSError):
                    freed += _remove(found[0])
            return found is not None

        async def delete() -> bool:
            await self._usage.used()  # counted before: a count made meanwhile saw the files
            try:
                async with self._usage.key_locks.of(key):  # not between a put's reading, removing
                    return await asyncio.to_thread(work)
            except OSError as exc:  # never the host's path: say what happened
                why = exc.strerror or "an I/O error"
                raise BindingError(
                    f"the object {key!r} could not be deleted ({why}); try again"
                ) from None
            finally:
                self._usage.release(freed)

        return await to_the_end(delete())

    async def list(
        self, prefix: str = "", limit: int = 1000, cursor: str | None = None
    ) -> dict[str, Any]:
        """Heads of objects whose key starts with ``prefix``, in key order:
        ``{"objects": [...], "truncated", "cursor"}``; pass ``cursor`` on while ``truncated``.
        A page holds at most ``limit`` (1 to 1000) objects, and fewer where their heads would
        pass ``MAX_PAGE_BYTES``. Each head file is read up to ``MAX_HEAD_BYTES`` only; lists of
        one bucket run one at a time."""
        check_grant(self._grants, "read", "this bucket")
        limit = page_limit(limit, 1000)
        prefix = _bound(prefix, "prefix")
        after = "" if cursor is None else _bound(cursor, "cursor")

        def matching() -> Iterator[tuple[str, int, dict[str, Any]]]:
            with contextlib.suppress(FileNotFoundError), os.scandir(self._root) as entries:
                for entry in entries:
                    if not entry.name.endswith(".head"):
                        continue
                    head = _load_head(Path(entry.path), MAX_HEAD_BYTES)
                    if head is not None and head["key"].startswith(prefix) and head["key"] > after:
                        yield head["key"], len(json.dumps(head)), head

        def work() -> tuple[builtins.list[dict[str, Any]], bool]:
            # The first limit + 1 by key, never more in memory, however many the bucket has.
            first = heapq.nsmallest(limit + 1, matching(), key=lambda found: found[0])
            page: builtins.list[dict[str, Any]] = []
            size = 0
            for _, head_size, head in first[:limit]:
                size += head_size
                if page and size > MAX_PAGE_BYTES:
                    return page, True
                page.append(_public(head))
            return page, len(first) > limit

        # One list of a bucket at a time: each reads every head in a thread of the pool all
        # bindings share, so a worker's burst of lists would otherwise take all of them.
        # Held until the thread is done, even if the caller goes.
        page, truncated = await holding(self._usage.listing, lambda: asyncio.to_thread(work))
        return {
            "objects": page,
            "truncated": truncated,
            "cursor": page[-1]["key"] if truncated else None,
        }
