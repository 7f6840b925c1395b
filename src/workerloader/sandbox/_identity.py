"""What the host and its zygote check of each other before any worker starts."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

__all__ = ["code_digest"]


def _sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 where there is one: hashlib's loads OpenSSL, ~0.5 MB and 15
    mappings in the zygote that every fork would copy and every worker's exit tear down. The
    digest is the same either way."""
    for name in ("_sha2", "_sha256"):  # 3.12+, 3.11
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
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
    digest = _sha256()(b"")
    for name in names:
        with open(os.path.join(package, name), "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return str(digest.hexdigest())[:16]
