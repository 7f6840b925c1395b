"""What the host and its zygote check of each other before any worker starts."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["code_digest"]


@functools.cache
def code_digest() -> str:
    """A digest of this workerloader's Python sources. The zygote sends its own with its
    ``ready``: a host never works with a zygote of other code (another checkout or install of
    the same version, on another interpreter), whose protocol may differ. ~100 files, read once
    a process."""
    package = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
