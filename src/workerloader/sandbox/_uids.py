"""Worker uids: each live worker has one of its own."""

from __future__ import annotations

__all__ = ["UID_COUNT", "UID_FIRST", "next_free_uid"]

UID_FIRST, UID_COUNT = 1000, 60000
"""The uids workers get, in the zygote's user namespace (mapped to unprivileged host ids)."""


def next_free_uid(turn: int, in_use: set[int]) -> tuple[int, int]:
    """The uid for the next worker and the turn after it: uids go round in turn, skipping any
    a live worker still has (a warm worker may outlive a whole round), so no two live workers
    ever share one. OSError if every uid is taken."""
    for _ in range(UID_COUNT):
        uid = UID_FIRST + turn
        turn = (turn + 1) % UID_COUNT
        if uid not in in_use:
            return uid, turn
    raise OSError("every worker uid is in use")
