"""Blobs: R2-like buckets of objects, one file per object, written atomically.

An object is written to a temporary file in the bucket's directory, fsynced, then renamed over
its final name (and the directory fsynced): after a crash there is the old object or the new one,
never a partial one. Keys map to file names by a hash, so no key can name a path outside the
bucket; the key itself is kept in the object's metadata file.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from .._errors import BindingError
from ..rpc import RpcTarget
from ._sqlite import Grants, check_grant

__all__ = ["BlobBucket"]

MAX_OBJECT_BYTES: Final = 64 << 20
CHUNK_BYTES: Final = 256 * 1024
MAX_KEY_BYTES: Final = 1024


def _key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
        raise BindingError(f"a blob key is a non-empty string of at most {MAX_KEY_BYTES} bytes")
    return key


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

        return await asyncio.to_thread(work)

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

    def _paths(self, key: str) -> tuple[Path, Path]:
        name = hashlib.sha256(key.encode()).hexdigest()
        return self._root / f"{name}.data", self._root / f"{name}.head"

    async def put(
        self,
        key: str,
        value: bytes | str | Iterable[bytes],
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Store ``value`` (bytes, str, or a list of byte chunks) under ``key``, atomically;
        returns the new object's head."""
        check_grant(self._grants, "write", "this bucket")
        key = _key(key)
        chunks = (
            [value.encode()]
            if isinstance(value, str)
            else ([value] if isinstance(value, bytes) else list(value))
        )
        if not all(isinstance(c, bytes) for c in chunks):
            raise BindingError("a blob value is bytes, str, or a list of bytes chunks")
        size = sum(len(c) for c in chunks)
        if size > MAX_OBJECT_BYTES:
            raise BindingError(f"a blob may be at most {MAX_OBJECT_BYTES} bytes")
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        data_path, head_path = self._paths(key)

        def work() -> dict[str, Any]:
            self._root.mkdir(parents=True, exist_ok=True)
            digest = hashlib.md5(usedforsecurity=False)
            tmp = data_path.with_suffix(f".tmp{os.getpid()}-{time.monotonic_ns()}")
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            head = {
                "key": key,
                "size": size,
                "etag": digest.hexdigest(),
                "metadata": meta,
                "uploaded": time.time(),
            }
            head_tmp = head_path.with_suffix(tmp.suffix + "h")
            head_tmp.write_text(json.dumps(head))
            with open(head_tmp, "rb") as f:
                os.fsync(f.fileno())
            # Data first, then the head that points at it: a head never describes a partial
            # object, and a crash between the two renames leaves the old head (whose etag no
            # longer matches) or no head (the object does not exist yet).
            os.replace(tmp, data_path)
            os.replace(head_tmp, head_path)
            _fsync_dir(self._root)
            return head

        return await asyncio.to_thread(work)

    def _read_head(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        data_path, head_path = self._paths(_key(key))
        try:
            head: dict[str, Any] = json.loads(head_path.read_text())
        except (OSError, ValueError):
            return None
        if head.get("key") != key or not data_path.exists():
            return None
        return data_path, head

    async def head(self, key: str) -> dict[str, Any] | None:
        """The object's head (key, size, etag, metadata, uploaded), or None."""
        check_grant(self._grants, "read", "this bucket")
        found = self._read_head(key)
        return None if found is None else found[1]

    async def get(self, key: str) -> BlobObject | None:
        """The object, to read whole or in chunks; None if absent."""
        check_grant(self._grants, "read", "this bucket")
        found = self._read_head(key)
        return None if found is None else BlobObject(*found)

    async def delete(self, key: str) -> bool:
        """Remove the object; True if it existed."""
        check_grant(self._grants, "write", "this bucket")
        data_path, head_path = self._paths(_key(key))
        existed = head_path.exists()
        with contextlib.suppress(FileNotFoundError):
            head_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            data_path.unlink()
        return existed

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
                        heads.append(head)
            return sorted(heads, key=lambda h: h["key"])

        heads = await asyncio.to_thread(work)
        page = heads[:limit]
        truncated = len(heads) > limit
        return {
            "objects": page,
            "truncated": truncated,
            "cursor": page[-1]["key"] if truncated else None,
        }
