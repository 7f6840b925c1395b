"""Limits that keep a hostile peer from hurting this side of a session."""

from __future__ import annotations

import msgspec

__all__ = ["RpcLimits"]


class RpcLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Every bound the RPC layer enforces, in one place.

    The same limits apply to what this side sends (so it never sends what a peer with the same
    limits would refuse) and to what it receives (where a violation aborts the session). See
    ``docs/protocol.md`` §7.
    """

    max_frame_bytes: int = 1 << 20
    """Largest frame body, in bytes. A larger incoming length aborts before the body is read."""

    max_depth: int = 64
    """Deepest nesting of containers in one value. Checked without recursion."""

    max_int_digits: int = 1000
    """Most decimal digits in an int outside the 64-bit range (at most 4300, CPython's own
    int/str conversion limit); Decimals may have this many digits too."""

    max_collection_len: int = 100_000
    """Most items in one list, dict, tuple, set or frozenset."""

    max_objects: int = 200_000
    """Most decoded objects (scalars and containers) in one value."""

    max_path_len: int = 32
    """Most steps in one push's path."""

    max_inflight: int = 256
    """Most pulled pushes from the peer being evaluated at once; beyond it, reading pauses."""

    max_exports: int = 10_000
    """Most live entries in this side's export table."""

    max_imports: int = 10_000
    """Most live entries in this side's import table."""

    max_answers: int = 10_000
    """Most answers the peer may leave unreleased."""

    write_high_water: int = 1 << 20
    """Bytes queued for sending above which local senders wait for the peer to read."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"RpcLimits.{name} must be at least 1")
        if self.max_int_digits > 4300:
            raise ValueError("RpcLimits.max_int_digits must be at most 4300")
        if self.max_frame_bytes >= 1 << 32:
            raise ValueError("RpcLimits.max_frame_bytes must fit the 4-byte length prefix")
