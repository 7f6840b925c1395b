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
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import IO, Any, Final

from .._errors import BindingError
from ..rpc import RpcTarget
from ._sqlite import Grants, check_grant

__all__ = ["BlobBucket"]

MAX_OBJECT_BYTES: Final = 64 << 20
CHUNK_BYTES: Final = 256 * 1024
MAX_KEY_BYTES: Final = 1024
_NOT_BYTES: Final = "a blob value is bytes, str, or a list of bytes chunks"


def _key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
        raise BindingError(f"a blob key is a non-empty string of at most {MAX_KEY_BYTES} bytes")
    return key


async def _each(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _pull(source: Callable[[], Awaitable[bytes | None]]) -> AsyncIterator[bytes]:
    while True:
        chunk = await source()
        if not chunk:
            return
        yield chunk


def _flush_and_sync(f: IO[Any]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _public(head: dict[str, Any]) -> dict[str, Any]:
    """A head as callers see it (without the internal data file name)."""
    return {k: v for k, v in head.items() if k != "data"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        if offset < 0 or not 0 < length <= CHUNK_BYTES:
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
    """One bucket: ``put``, ``get``, ``head``, ``delete``, ``list``."""

    def __init__(self, root: Path, grants: Grants) -> None:
        self._root = root
        self._grants = grants

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
        ``b""`` or None (from a worker: pass the function itself, it crosses as a stub).
        """
        check_grant(self._grants, "write", "this bucket")
        key = _key(key)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        if callable(value):
            chunks = _pull(value)
        else:
            # A value whose size is known up front is checked before anything is written.
            if isinstance(value, str):
                value = value.encode()
            items: list[object] = [value] if isinstance(value, bytes) else list(value)
            given = [c for c in items if isinstance(c, bytes)]
            if len(given) != len(items):
                raise BindingError(_NOT_BYTES)
            if sum(len(c) for c in given) > MAX_OBJECT_BYTES:
                raise BindingError(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
            chunks = _each(given)
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        data_path = self._root / f"{uuid.uuid4().hex}.data"  # never reused: old heads stay valid
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        f = await asyncio.to_thread(open, data_path, "wb")
        try:
            async for chunk in chunks:
                if not isinstance(chunk, bytes):
                    raise BindingError(_NOT_BYTES)
                size += len(chunk)
                if size > MAX_OBJECT_BYTES:
                    raise BindingError(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_flush_and_sync, f)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                data_path.unlink()
            raise
        f.close()
        head = {
            "key": key,
            "size": size,
            "etag": digest.hexdigest(),
            "metadata": meta,
            "uploaded": time.time(),
            "data": data_path.name,
        }
        return await asyncio.to_thread(self._commit, key, head)

    def _commit(self, key: str, head: dict[str, Any]) -> dict[str, Any]:
        """Point the key's head at the new data (the commit point), then drop the old data."""
        previous = self._read_head(key)
        head_tmp = self._root / f"{uuid.uuid4().hex}.tmp"
        with open(head_tmp, "w") as f:
            f.write(json.dumps(head))
            _flush_and_sync(f)
        os.replace(head_tmp, self._head_path(key))
        _fsync_dir(self._root)
        if previous is not None:
            with contextlib.suppress(FileNotFoundError):
                previous[0].unlink()
        return _public(head)

    def _read_head(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        try:
            head: dict[str, Any] = json.loads(self._head_path(_key(key)).read_text())
        except (OSError, ValueError):
            return None
        data = self._root / str(head.get("data", ""))
        if head.get("key") != key or data.parent != self._root or not data.is_file():
            return None
        return data, head

    async def head(self, key: str) -> dict[str, Any] | None:
        """The object's head (key, size, etag, metadata, uploaded), or None."""
        check_grant(self._grants, "read", "this bucket")
        found = self._read_head(key)
        return None if found is None else _public(found[1])

    async def get(self, key: str) -> BlobObject | None:
        """The object, to read whole or in chunks; None if absent."""
        check_grant(self._grants, "read", "this bucket")
        found = self._read_head(key)
        return None if found is None else BlobObject(*found)

    async def delete(self, key: str) -> bool:
        """Remove the object; True if it existed."""
        check_grant(self._grants, "write", "this bucket")
        found = self._read_head(key)
        with contextlib.suppress(FileNotFoundError):
            self._head_path(_key(key)).unlink()
        if found is not None:
            with contextlib.suppress(FileNotFoundError):
                found[0].unlink()
        return found is not None

    async def list(
        self, prefix: str = "", limit: int = 1000, cursor: str | None = None
    ) -> dict[str, Any]:
        """Heads of objects whose key starts with ``prefix``, in key order:
        ``{"objects": [...], "truncated", "cursor"}``."""
        check_grant(self._grants, "read", "this bucket")
        if not 1 <= limit <= 1000:
            raise BindingError("limit must be between 1 and 1000")

        def work() -> list[dict[str, Any]]:
            heads = []
            for path in self._root.glob("*.head") if self._root.exists() else ():
                with contextlib.suppress(OSError, ValueError):
                    head = json.loads(path.read_text())
                    if head["key"].startswith(prefix) and head["key"] > (cursor or ""):
                        heads.append(_public(head))
            return sorted(heads, key=lambda h: h["key"])

        heads = await asyncio.to_thread(work)
        page = heads[:limit]
        truncated = len(heads) > limit
        return {
            "objects": page,
            "truncated": truncated,
            "cursor": page[-1]["key"] if truncated else None,
        }
