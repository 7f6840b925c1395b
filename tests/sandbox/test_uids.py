"""Worker uids go round in turn and never give a live worker's uid to another."""

from __future__ import annotations

import pytest

from workerloader.sandbox._uids import UID_COUNT, UID_FIRST, next_free_uid


def test_uids_are_handed_out_in_turn_and_wrap_around() -> None:
    assert next_free_uid(0, set()) == (UID_FIRST, 1)
    assert next_free_uid(UID_COUNT - 1, set()) == (UID_FIRST + UID_COUNT - 1, 0)


def test_a_uid_a_live_worker_still_has_is_skipped_after_a_whole_round() -> None:
    # A warm worker started with the first uid is still alive when the round comes back.
    assert next_free_uid(0, {UID_FIRST, UID_FIRST + 1}) == (UID_FIRST + 2, 3)


def test_when_every_uid_is_taken_no_worker_is_started() -> None:
    with pytest.raises(OSError, match="every worker uid is in use"):
        next_free_uid(5, set(range(UID_FIRST, UID_FIRST + UID_COUNT)))
