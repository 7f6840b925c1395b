"""What the host and its zygote check of each other before any worker starts."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Protocol, cast

__all__ = ["code_digest"]


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def _sha256() -> Callable[[], _Hash]:
    """CPython's own SHA-256 where there is one: hashlib's loads OpenSSL, ~0.5 MB and 16
    mappings in the zygote (the module of its own adds 5 where it is not built in) that every
    fork would copy and every worker's exit take down. The digest is the same either way."""
    for name in ("_sha2", "_sha256"):  # 3.12+, 3.11
        try:
            return cast("Callable[[], _Hash]", importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            pass
    import hashlib

    return hashlib.sha256


@functools.cache
def code_digest() -> str:
    """A digest of this workerloader's Python sources. The zygote sends its own with its
    ``ready``: a host never works with a zygote of other code (another checkout or install of
    the same version, on another interpreter), whose protocol may differ. ~100 files, read once
    a process. (``os``, not pathlib, which would bring urllib and ipaddress into the zygote.)"""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = sorted(
        os.path.relpath(os.path.join(folder, name), package)
        for folder, _, files in os.walk(package)
        for name in files
        if name.endswith(".py")
    )
    digest = _sha256()()
    for name in names:
        with open(os.path.join(package, name), "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return digest.hexdigest()[:16]
