"""Every field of ``RpcLimits`` attacked as a hostile peer would (``docs/protocol.md`` §7).

Most tests drive the sans-IO core ``Session`` directly with frames built by hand and check that
the defended side aborts: a ``Closed`` event naming the violated limit and an ``Abort`` frame
queued for the peer. The flow-control limits (``max_inflight``, ``write_high_water``) and the
file-descriptor rule of §1 are checked through the asyncio driver over real sockets.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import re
import socket
import struct
import termios
import types
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pytest

from workerloader.rpc import (
    DataCloneError,
    FrameTooLarge,
    RpcLimits,
    RpcSession,
    RpcTarget,
    _wire,
    connect,
    memory_pair,
)
from workerloader.rpc._core import Closed, Evaluate, Event, Session
from workerloader.rpc._wire import Abort, Hello, Message, Pull, Push, Reject, Release, Resolve

# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class FakeImport:
    """What the stub codec makes for an import: it only records the id."""

    import_id: int


class StubCodec:
    """A minimal ``StubCodec``: functions are capabilities, nothing is ever unwrapped."""

    def __init__(self) -> None:
        self.wrapped: list[int] = []

    def wrap_import(self, session: Session, import_id: int) -> object:
        self.wrapped.append(import_id)
        return FakeImport(import_id)

    def unwrap_import(self, session: Session, value: object) -> int | None:
        return None

    def is_capability(self, value: object) -> bool:
        return isinstance(value, types.FunctionType)

    def answer_ref(self, session: Session, value: object) -> int | None:
        return None


def main_function(*args: object, **kwargs: object) -> object:
    """The main capability of sans-IO sessions (a function, so pushes may call it)."""
    return args


PEER_HELLO = _wire.encode_frame(Hello(1, 1 << 20))
HEADER = struct.Struct(">I")


def frame(message: Message) -> bytes:
    return _wire.encode_frame(message)


def raw_frame(obj: object) -> bytes:
    """A frame whose body is any msgpack, valid message or not."""
    body = msgspec.msgpack.encode(obj)
    return HEADER.pack(len(body)) + body


def body_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def call(push_id: int, *positional: object, target: int = 0, pull: bool = True) -> bytes:
    """A Push calling ``target`` with wire-form positional arguments."""
    return frame(Push(push_id, target, [], [list(positional), {}], pull))


def split_frames(data: bytes) -> list[Message]:
    """Decode a byte string holding whole frames."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        (size,) = HEADER.unpack_from(data, pos)
        out.append(_wire.decode_message(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    assert pos == len(data), "trailing partial frame"
    return out


def drain_events(session: Session) -> list[Event]:
    events: list[Event] = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def open_session(
    limits: RpcLimits | None = None, main: object = main_function
) -> tuple[Session, StubCodec]:
    """A session that has sent its Hello and received the peer's ``Hello(1, 1 MiB)``."""
    codec = StubCodec()
    session = Session(main, codec, limits=limits)
    assert split_frames(session.data_to_send()) == [
        Hello(_wire.PROTOCOL_VERSION, session.limits.max_frame_bytes)
    ]
    session.receive_data(PEER_HELLO)
    assert session.data_to_send() == b""
    assert drain_events(session) == []
    assert not session.closed
    return session, codec


ABORT_PREFIX = "session aborted: "


def assert_aborted(session: Session, pattern: str) -> None:
    """The session aborted for a reason matching ``pattern`` (whole reason), told the peer with
    an Abort frame carrying that reason, and ignores anything the peer sends afterwards."""
    events = drain_events(session)
    assert events, "no event: the session did not abort"
    closed = events[-1]
    assert isinstance(closed, Closed), f"expected Closed, got {events!r}"
    assert not any(isinstance(e, Closed) for e in events[:-1])
    text = str(closed.error)
    assert text.startswith(ABORT_PREFIX), text
    reason = text[len(ABORT_PREFIX) :]
    assert re.fullmatch(pattern, reason), f"{reason!r} does not match {pattern!r}"
    frames = split_frames(session.data_to_send())
    assert frames, "no Abort frame was queued"
    last = frames[-1]
    assert isinstance(last, Abort), f"last frame is {last!r}"
    error_type, error_message, traceback = last.error
    assert error_type.rsplit(".", 1)[-1] == "ProtocolError"
    assert error_message == reason
    assert traceback is None
    assert session.closed
    assert not session.wants_input
    # Nothing follows an abort.
    session.receive_data(call(1))
    assert drain_events(session) == []
    assert session.data_to_send() == b""


def assert_alive(session: Session) -> list[Event]:
    """The session did not close; return its events."""
    events = drain_events(session)
    assert not any(isinstance(e, Closed) for e in events), events
    assert not session.closed
    return events


def nest(levels: int, shape: str) -> object:
    """A wire value of exactly ``levels`` nested containers, the innermost an empty list."""
    value: object = []
    for _ in range(levels - 1):
        if shape == "list":
            value = [value]
        elif shape == "map":
            value = {"k": value}
        elif shape == "tuple":
            value = {2: [value]}
        elif shape == "pairs":
            value = {1: [1, value]}
        else:
            raise AssertionError(shape)
    return value


def args_of_depth(total_levels: int, shape: str = "list") -> object:
    """Push arguments ``[[value], {}]`` nested ``total_levels`` containers deep in all (the
    arguments wrapper and the positional list are levels 1 and 2)."""
    assert total_levels >= 3
    return [[nest(total_levels - 2, shape)], {}]


def make_functions(n: int) -> list[Callable[[], int]]:
    """``n`` distinct function objects (each a separate capability)."""
    out: list[Callable[[], int]] = []
    for i in range(n):

        def f(i: int = i) -> int:
            return i

        out.append(f)
    return out


# ---------------------------------------------------------------------------------------------
# max_frame_bytes


@pytest.mark.parametrize("size", [1025, 1 << 20, (1 << 32) - 1])
def test_frame_header_over_the_cap_aborts_before_the_body(size: int) -> None:
    session, _ = open_session(RpcLimits(max_frame_bytes=1024))
    session.receive_data(HEADER.pack(size))  # only the header: no body ever arrives
    assert_aborted(session, rf"frame of {size} bytes from peer exceeds the limit of 1024")


def test_frame_header_over_the_cap_aborts_when_it_arrives_byte_by_byte() -> None:
    session, _ = open_session(RpcLimits(max_frame_bytes=1024))
    header = HEADER.pack(5000)
    for byte in header[:3]:
        session.receive_data(bytes([byte]))
        assert assert_alive(session) == []
        assert session.data_to_send() == b""
    session.receive_data(header[3:])
    assert_aborted(session, r"frame of 5000 bytes from peer exceeds the limit of 1024")


def test_zero_length_frame_aborts() -> None:
    session, _ = open_session()
    session.receive_data(HEADER.pack(0))
    assert_aborted(session, r"frame of 0 bytes from peer exceeds the limit of 1048576")


def _push_with_body_size(size: int) -> bytes:
    # Push(1, 0, [], [[bin], {}], True) has 12 bytes of overhead around a bin16 payload.
    data = frame(Push(1, 0, [], [[b"x" * (size - 12)], {}], True))
    assert len(data) == 4 + size
    return data


def test_frame_of_exactly_the_cap_is_accepted() -> None:
    session, _ = open_session(RpcLimits(max_frame_bytes=1024))
    session.receive_data(_push_with_body_size(1024))
    events = assert_alive(session)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)
    assert events[0].args == [b"x" * 1012]


def test_whole_frame_one_byte_over_the_cap_aborts() -> None:
    session, _ = open_session(RpcLimits(max_frame_bytes=1024))
    session.receive_data(_push_with_body_size(1025))
    assert_aborted(session, r"frame of 1025 bytes from peer exceeds the limit of 1024")


# ---------------------------------------------------------------------------------------------
# max_depth


@pytest.mark.parametrize("shape", ["list", "map", "tuple", "pairs"])
def test_value_far_deeper_than_max_depth_aborts(shape: str) -> None:
    session, _ = open_session(RpcLimits(max_depth=8))
    session.receive_data(frame(Push(1, 0, [], args_of_depth(20, shape), True)))
    assert_aborted(session, r"invalid value from peer: nesting deeper than 8 levels")


@pytest.mark.parametrize("shape", ["list", "map", "tuple", "pairs"])
def test_value_exactly_max_depth_deep_is_accepted(shape: str) -> None:
    session, _ = open_session(RpcLimits(max_depth=8))
    session.receive_data(frame(Push(1, 0, [], args_of_depth(8, shape), True)))
    events = assert_alive(session)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)


@pytest.mark.parametrize("shape", ["list", "map", "tuple", "pairs"])
def test_value_one_level_deeper_than_max_depth_aborts(shape: str) -> None:
    # §7: max_depth is the number of nested containers allowed; one more is a violation.
    session, _ = open_session(RpcLimits(max_depth=8))
    session.receive_data(frame(Push(1, 0, [], args_of_depth(9, shape), True)))
    assert_aborted(session, r"invalid value from peer: nesting deeper than 8 levels")


@pytest.mark.parametrize(
    "unit",
    [b"\x91", b"\x81\xa1k", b"\x81\x02\x91"],  # [x], {"k": x}, {2: [x]}
    ids=["list", "map", "tuple"],
)
def test_hundred_thousand_levels_abort_without_crashing(unit: bytes) -> None:
    # Deeper than msgspec's own recursion guard: decoding must fail cleanly, not crash.
    session, _ = open_session()
    # fixarray(5) Push: kind 1, id 1, target 0, path [], args=<deep>, pull true
    body = b"\x96\x01\x01\x00\x90" + unit * 100_000 + b"\xc0" + b"\xc3"
    session.receive_data(body_frame(body))
    assert_aborted(session, r"invalid message from peer: .*recursion.*")


# ---------------------------------------------------------------------------------------------
# max_int_digits


@pytest.mark.parametrize("digits", ["9" * 40, "-" + "9" * 40, "1" * 5000])
def test_big_int_with_too_many_digits_aborts(digits: str) -> None:
    session, _ = open_session(RpcLimits(max_int_digits=20))
    session.receive_data(call(1, {7: digits}))
    assert_aborted(session, r"invalid value from peer: an int of more than 20 digits")


@pytest.mark.parametrize("digits", ["9" * 20, "-" + "9" * 20])
def test_big_int_with_max_int_digits_digits_is_accepted(digits: str) -> None:
    session, _ = open_session(RpcLimits(max_int_digits=20))
    session.receive_data(call(1, {7: digits}))
    events = assert_alive(session)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)
    assert events[0].args == [int(digits)]


def test_big_int_one_digit_over_max_int_digits_aborts() -> None:
    session, _ = open_session(RpcLimits(max_int_digits=20))
    session.receive_data(call(1, {7: "9" * 21}))  # 21 digits, no sign
    assert_aborted(session, r"invalid value from peer: an int of more than 20 digits")


# ---------------------------------------------------------------------------------------------
# max_collection_len


@pytest.mark.parametrize(
    "value",
    [
        list(range(11)),
        {2: list(range(11))},
        {3: list(range(11))},
        {4: list(range(11))},
        {f"k{i}": i for i in range(11)},
        {1: [x for i in range(11) for x in (i, i)]},
    ],
    ids=["list", "tuple", "set", "frozenset", "map", "pairs"],
)
def test_collection_longer_than_max_collection_len_aborts(value: object) -> None:
    session, _ = open_session(RpcLimits(max_collection_len=10))
    session.receive_data(call(1, value))
    assert_aborted(session, r"invalid value from peer: a container of more than 10 items")


def test_huge_collection_aborts_with_default_limits() -> None:
    session, _ = open_session()
    session.receive_data(call(1, [0] * 100_001))
    assert_aborted(session, r"invalid value from peer: a container of more than 100000 items")


@pytest.mark.parametrize(
    "value",
    [
        list(range(10)),
        {2: list(range(10))},
        {3: list(range(10))},
        {f"k{i}": i for i in range(10)},
        {1: [x for i in range(10) for x in (i, i)]},
    ],
    ids=["list", "tuple", "set", "map", "pairs"],
)
def test_collection_of_exactly_max_collection_len_is_accepted(value: object) -> None:
    # A dict of 10 entries is one container of 10 items (§7), and the sender's encoder counts
    # it so: it must not be refused by a receiver with the same limit.
    session, _ = open_session(RpcLimits(max_collection_len=10))
    session.receive_data(call(1, value))
    events = assert_alive(session)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)


# ---------------------------------------------------------------------------------------------
# max_objects


def test_too_many_objects_aborts() -> None:
    session, _ = open_session(RpcLimits(max_objects=50))
    session.receive_data(call(1, [[i] for i in range(30)]))
    assert_aborted(session, r"invalid value from peer: more than 50 objects")


def test_too_many_objects_aborts_with_default_limits() -> None:
    # 1,000 lists of 250 ints: no container is long, but the value has 251,000+ objects.
    session, _ = open_session()
    session.receive_data(call(1, [[0] * 250 for _ in range(1000)]))
    assert_aborted(session, r"invalid value from peer: more than 200000 objects")


# ---------------------------------------------------------------------------------------------
# A value this side's encoder accepts must be accepted by a peer with the same limits (§7, and
# the RpcLimits docstring: "so it never sends what a peer with the same limits would refuse").


def _shared_refs() -> list[object]:
    inner: list[object] = []
    return [inner] * 90


@pytest.mark.parametrize(
    ("limits", "value"),
    [
        (RpcLimits(max_depth=8), nest(6, "list")),
        (RpcLimits(max_int_digits=20), -(10**20 - 1)),
        (RpcLimits(max_collection_len=10), list(range(10))),
        (RpcLimits(max_collection_len=10), {f"k{i}": i for i in range(10)}),
        (RpcLimits(max_collection_len=10), {(i,): i for i in range(10)}),
        (RpcLimits(max_objects=100), _shared_refs()),
        (RpcLimits(max_objects=100), {f"k{i}": i for i in range(60)}),
    ],
    ids=["depth", "int", "list", "str-dict", "tuple-key-dict", "shared-refs", "objects-dict"],
)
def test_what_the_sender_accepts_a_peer_with_the_same_limits_accepts(
    limits: RpcLimits, value: object
) -> None:
    sender = Session(None, StubCodec(), limits=limits)
    receiver = Session(main_function, StubCodec(), limits=limits)
    sender.receive_data(receiver.data_to_send())
    receiver.receive_data(sender.data_to_send())
    sender.push(0, [], ([value], {}), pull=True)  # the sender's limits let it through
    receiver.receive_data(sender.data_to_send())
    events = assert_alive(receiver)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)
    assert events[0].args == [value]


# ---------------------------------------------------------------------------------------------
# max_path_len


def test_push_path_longer_than_max_path_len_aborts() -> None:
    session, _ = open_session(RpcLimits(max_path_len=4))
    session.receive_data(frame(Push(1, 0, ["a", "b", 0, "c", "d"], None, True)))
    assert_aborted(session, r"push path longer than 4 steps")


def test_huge_push_path_aborts_with_default_limits() -> None:
    session, _ = open_session()
    session.receive_data(frame(Push(1, 0, ["x"] * 100_000, None, True)))
    assert_aborted(session, r"push path longer than 32 steps")


def test_push_path_of_max_path_len_is_accepted() -> None:
    session, _ = open_session(RpcLimits(max_path_len=4))
    session.receive_data(frame(Push(1, 0, ["a", "b", 0, "c"], None, True)))
    events = assert_alive(session)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)
    assert events[0].path == ["a", "b", 0, "c"]


def test_local_push_with_too_long_a_path_sends_nothing() -> None:
    session, _ = open_session(RpcLimits(max_path_len=4))
    with pytest.raises(ValueError, match=r"^path of 5 steps exceeds 4$"):
        session.push(0, ["a"] * 5, None, pull=True)
    assert session.data_to_send() == b""
    assert session.push(0, ["a"] * 4, None, pull=True) == 1


# ---------------------------------------------------------------------------------------------
# Malformed messages: unknown kinds, extension types, invalid values


@pytest.mark.parametrize(
    ("message", "pattern"),
    [
        ([99, 1], r"invalid message from peer: .*\b99\b.*"),
        ([7, 1], r"invalid message from peer: .*\b7\b.*"),
        ([-1], r"invalid message from peer: .*"),
        ({"kind": 1}, r"invalid message from peer: .*"),
        (5, r"invalid message from peer: .*"),
        ([1, "1", 0, [], None, True], r"invalid message from peer: .*"),
        (msgspec.msgpack.Ext(1, b"x"), r"invalid message from peer: .*`ext`.*"),
    ],
    ids=["kind-99", "kind-7", "kind-negative", "map", "int", "bad-field", "ext-message"],
)
def test_invalid_message_aborts(message: object, pattern: str) -> None:
    session, _ = open_session()
    session.receive_data(raw_frame(message))
    assert_aborted(session, pattern)


def test_frame_body_that_is_not_msgpack_aborts() -> None:
    session, _ = open_session()
    session.receive_data(body_frame(b"\xc1"))  # never-used msgpack byte
    assert_aborted(session, r"invalid message from peer: .*")


@pytest.mark.parametrize("code", [0, 5, 127, -128])
def test_msgpack_extension_in_a_value_aborts(code: int) -> None:
    session, _ = open_session()
    ext = msgspec.msgpack.Ext(code, b"payload")
    session.receive_data(raw_frame([1, 1, 0, [], [[{"deep": [ext]}], {}], True]))
    assert_aborted(session, rf"invalid message from peer: msgpack extension type {code}")


def test_msgpack_timestamp_extension_in_a_value_aborts() -> None:
    # msgspec decodes ext -1 (timestamp) itself, without the ext hook; the clone still refuses it.
    session, _ = open_session()
    ext = msgspec.msgpack.Ext(-1, b"\x00\x00\x00\x01")
    session.receive_data(raw_frame([1, 1, 0, [], [[ext], {}], True]))
    assert_aborted(session, r"invalid value from peer: unexpected datetime")


def test_msgpack_extension_in_a_path_aborts() -> None:
    session, _ = open_session()
    ext = msgspec.msgpack.Ext(5, b"x")
    session.receive_data(raw_frame([1, 1, 0, [ext], None, True]))
    assert_aborted(session, r"invalid message from peer: .*`ext`.*")


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ({6: 1}, r"invalid value from peer: unknown tag 6"),
        ({99: []}, r"invalid value from peer: unknown tag 99"),
        ({1: 2, 3: 4}, r"invalid value from peer: a map whose keys are not all str"),
        ({0: 5}, r"invalid value from peer: a back-reference to nothing"),
        ({1: [1]}, r"invalid value from peer: malformed dict"),
        ({3: [[1]]}, r"invalid value from peer: an unhashable set member"),
    ],
    ids=["tag-6", "tag-99", "int-keys", "dangling-ref", "odd-pairs", "unhashable"],
)
def test_invalid_value_aborts(value: object, pattern: str) -> None:
    session, _ = open_session()
    session.receive_data(call(1, value))
    assert_aborted(session, pattern)


# ---------------------------------------------------------------------------------------------
# Forged and stale capability ids, and out-of-sequence messages


@pytest.mark.parametrize(
    ("frames", "pattern"),
    [
        ([call(1, target=-5)], r"push on unknown or released capability -5"),
        ([call(1, target=7)], r"push on unknown or released answer 7"),
        ([call(1, target=1)], r"push on unknown or released answer 1"),
        ([call(1, pull=False), call(2, target=3)], r"push on unknown or released answer 3"),
        ([frame(Release(-3, 1))], r"invalid release of capability -3"),
        ([frame(Release(4, 1))], r"invalid release of answer 4"),
        ([frame(Release(0, 1))], r"the main capability cannot be released"),
        ([call(1, pull=False), frame(Release(1, 2))], r"invalid release of answer 1"),
        (
            [call(1, pull=False), frame(Release(1, 1)), frame(Release(1, 1))],
            r"invalid release of answer 1",
        ),
        ([call(1, {21: -99})], r"invalid value from peer: unknown capability -99"),
        ([call(1, {21: 0})], r"invalid value from peer: unknown capability 0"),
        ([call(1, {20: 3})], r"invalid value from peer: bad export id 3"),
        ([call(1, {20: 0})], r"invalid value from peer: bad export id 0"),
        ([call(1, {20: "x"})], r"invalid value from peer: malformed capability"),
        ([call(2)], r"push id 2 out of sequence \(expected 1\)"),
        ([call(0)], r"push id 0 out of sequence \(expected 1\)"),
        ([call(1), call(1)], r"push id 1 out of sequence \(expected 2\)"),
        ([call(1), call(3)], r"push id 3 out of sequence \(expected 2\)"),
        ([frame(Pull(3))], r"invalid pull of answer 3"),
        ([call(1), frame(Pull(1))], r"invalid pull of answer 1"),
        ([frame(Resolve(1, None))], r"answer for unknown question 1"),
        ([frame(Reject(1, ("ValueError", "x", None)))], r"answer for unknown question 1"),
        ([PEER_HELLO], r"peer sent Hello twice"),
    ],
    ids=[
        "push-unknown-export",
        "push-unknown-answer",
        "push-on-itself",
        "push-on-future-answer",
        "release-unknown-export",
        "release-unknown-answer",
        "release-main",
        "release-answer-twice-count",
        "release-answer-again",
        "import-unknown",
        "import-zero",
        "export-positive",
        "export-zero",
        "export-not-int",
        "push-id-gap",
        "push-id-zero",
        "push-id-replayed",
        "push-id-skipped",
        "pull-unknown",
        "pull-already-pulled",
        "resolve-unknown",
        "reject-unknown",
        "hello-twice",
    ],
)
def test_forged_ids_abort(frames: list[bytes], pattern: str) -> None:
    session, _ = open_session()
    session.receive_data(b"".join(frames))
    assert_aborted(session, pattern)


def test_first_frame_must_be_hello() -> None:
    session = Session(main_function, StubCodec())
    session.data_to_send()
    session.receive_data(call(1))
    assert_aborted(session, r"peer did not start with Hello")


def test_unsupported_version_aborts() -> None:
    session = Session(main_function, StubCodec())
    session.data_to_send()
    session.receive_data(frame(Hello(0, 1 << 20)))
    assert_aborted(session, r"unsupported protocol version 0")


def _session_with_one_export() -> Session:
    """A session that sent the peer one capability, export -1, introduced once."""
    session, _ = open_session()
    (callback,) = make_functions(1)
    assert session.push(0, ["subscribe"], ([callback], {}), pull=True) == 1
    (push,) = split_frames(session.data_to_send())
    assert isinstance(push, Push)
    assert push.args == [[{20: -1}], {}]
    assert session.table_sizes()["exports"] == 1
    return session


def test_export_is_usable_until_released() -> None:
    session = _session_with_one_export()
    session.receive_data(call(1, 5, target=-1) + frame(Release(-1, 1)))
    events = assert_alive(session)
    assert len(events) == 1
    assert isinstance(events[0], Evaluate)
    assert events[0].args == [5]
    assert session.table_sizes()["exports"] == 0


@pytest.mark.parametrize(
    ("after_release", "pattern"),
    [
        (call(1, target=-1), r"push on unknown or released capability -1"),
        (call(1, {21: -1}), r"invalid value from peer: unknown capability -1"),
        (frame(Release(-1, 1)), r"invalid release of capability -1"),
    ],
    ids=["push", "import-tag", "release-again"],
)
def test_stale_export_id_aborts(after_release: bytes, pattern: str) -> None:
    session = _session_with_one_export()
    session.receive_data(frame(Release(-1, 1)))
    assert_alive(session)
    assert session.table_sizes()["exports"] == 0
    session.receive_data(after_release)
    assert_aborted(session, pattern)


def test_releasing_more_references_than_introduced_aborts() -> None:
    session = _session_with_one_export()
    session.receive_data(frame(Release(-1, 2)))
    assert_aborted(session, r"invalid release of capability -1")


# ---------------------------------------------------------------------------------------------
# max_inflight


class Gate(RpcTarget):
    """A main capability whose calls all block until ``opened`` is set."""

    def __init__(self, quorum: int) -> None:
        self.opened = asyncio.Event()
        self.quorum = quorum
        self.reached = asyncio.Event()
        self.running = 0
        self.peak = 0
        self.started = 0

    async def hold(self, i: int) -> int:
        self.started += 1
        self.running += 1
        if self.running >= self.quorum:
            self.reached.set()
        self.peak = max(self.peak, self.running)
        try:
            await self.opened.wait()
        finally:
            self.running -= 1
        return i * 2


async def _sessions(
    transport: str, main: object, limits: RpcLimits
) -> tuple[RpcSession, RpcSession]:
    """(callee, caller): ``caller.main`` is ``main``, served by ``callee``."""
    if transport == "memory":
        return await memory_pair(main, None, limits=limits)
    a, b = socket.socketpair()
    callee = await connect(a, main, limits=limits)
    caller = await connect(b, None, limits=limits)
    return callee, caller


@pytest.mark.parametrize("transport", ["memory", "socketpair"])
async def test_max_inflight_bounds_concurrent_evaluations(transport: str) -> None:
    limits = RpcLimits(max_inflight=4)
    gate = Gate(quorum=4)
    callee, caller = await _sessions(transport, gate, limits)

    async def one(i: int) -> int:
        result = await caller.main.hold(i)
        assert isinstance(result, int)
        return result

    calls = [asyncio.create_task(one(i)) for i in range(20)]
    try:
        async with asyncio.timeout(5):
            await gate.reached.wait()
        await asyncio.sleep(0.1)  # room for any further call to start, if it could
        assert gate.peak <= 4, f"{gate.peak} calls ran at once with max_inflight=4"
        assert gate.running == 4
        assert not any(task.done() for task in calls)
        gate.opened.set()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*calls)
        assert results == [2 * i for i in range(20)]
        assert gate.started == 20
        assert gate.peak <= 4, f"{gate.peak} calls ran at once with max_inflight=4"
    finally:
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await caller.aclose()
        await callee.aclose()
        await asyncio.sleep(0.01)


def test_core_defers_pushes_and_asks_to_stop_reading_at_max_inflight() -> None:
    session, _ = open_session(RpcLimits(max_inflight=4))
    session.receive_data(b"".join(call(i) for i in range(1, 6)))
    events = assert_alive(session)
    assert [e.answer_id for e in events if isinstance(e, Evaluate)] == [1, 2, 3, 4]
    assert session.running == 4
    assert not session.wants_input  # push 5 waits, decoded; the driver stops reading
    session.resolve(1, None)
    events = assert_alive(session)
    assert [e.answer_id for e in events if isinstance(e, Evaluate)] == [5]
    assert session.running == 4
    assert session.wants_input


# ---------------------------------------------------------------------------------------------
# max_exports


def test_local_send_beyond_max_exports_raises_and_sends_nothing() -> None:
    session, _ = open_session(RpcLimits(max_exports=3))
    functions = make_functions(4)
    with pytest.raises(DataCloneError, match=r"^more than 3 capabilities exported at once$"):
        session.push(0, ["f"], (list(functions), {}), pull=True)
    assert session.data_to_send() == b""
    assert session.table_sizes() == {"exports": 0, "imports": 0, "questions": 0, "answers": 0}
    # The same capability sent many times is one entry.
    assert session.push(0, ["f"], ([functions[0]] * 50, {}), pull=True) == 1
    assert session.table_sizes()["exports"] == 1


def test_peer_cannot_make_this_side_export_beyond_max_exports() -> None:
    # A hostile peer calls a method that returns a fresh capability each time and never
    # releases the imports: the result that would exceed max_exports is rejected instead.
    session, _ = open_session(RpcLimits(max_exports=3))
    functions = make_functions(5)
    for i in range(1, 5):
        session.receive_data(call(i))
        (event,) = assert_alive(session)
        assert isinstance(event, Evaluate)
        session.resolve(event.answer_id, functions[i - 1])
    frames = split_frames(session.data_to_send())
    assert frames[:3] == [Resolve(1, {20: -1}), Resolve(2, {20: -2}), Resolve(3, {20: -3})]
    assert frames[3] == Reject(
        4,
        ("workerloader.DataCloneError", "more than 3 capabilities exported at once", None),
    )
    assert len(frames) == 4
    assert session.table_sizes()["exports"] == 3
    # Once the peer releases one, a new export fits again.
    session.receive_data(frame(Release(-2, 1)) + call(5))
    (event,) = assert_alive(session)
    assert isinstance(event, Evaluate)
    session.resolve(event.answer_id, functions[4])
    assert split_frames(session.data_to_send()) == [Resolve(5, {20: -4})]
    assert session.table_sizes()["exports"] == 3


# ---------------------------------------------------------------------------------------------
# max_imports


def test_peer_exporting_more_than_max_imports_in_one_value_aborts() -> None:
    session, _ = open_session(RpcLimits(max_imports=3))
    session.receive_data(call(1, {20: -1}, {20: -2}, {20: -3}, {20: -4}))
    assert_aborted(session, r"peer exported more than 3 capabilities")


def test_peer_exporting_more_than_max_imports_across_messages_aborts() -> None:
    session, codec = open_session(RpcLimits(max_imports=3))
    session.receive_data(call(1, {20: -1}, {20: -2}) + call(2, {20: -3}, {20: -1}))
    events = assert_alive(session)
    assert [e.args for e in events if isinstance(e, Evaluate)] == [
        [FakeImport(-1), FakeImport(-2)],
        [FakeImport(-3), FakeImport(-1)],
    ]
    assert codec.wrapped == [-1, -2, -3, -1]
    assert session.table_sizes()["imports"] == 3
    session.receive_data(call(3, {20: -4}))
    assert_aborted(session, r"peer exported more than 3 capabilities")


def test_same_import_many_times_is_one_entry_and_released_imports_free_room() -> None:
    session, _ = open_session(RpcLimits(max_imports=3))
    session.receive_data(call(1, *([{20: -1}] * 100)))
    assert len(assert_alive(session)) == 1
    assert session.table_sizes()["imports"] == 1
    session.receive_data(call(2, {20: -2}, {20: -3}))
    assert len(assert_alive(session)) == 1
    # Drop every local stub for -1 (100 introductions): one Release with the full count.
    for _ in range(100):
        session.release_import(-1)
    assert split_frames(session.data_to_send()) == [Release(-1, 100)]
    assert session.table_sizes()["imports"] == 2
    session.receive_data(call(3, {20: -4}))
    assert len(assert_alive(session)) == 1
    assert session.table_sizes()["imports"] == 3


# ---------------------------------------------------------------------------------------------
# max_answers


def test_peer_leaving_more_than_max_answers_unreleased_aborts() -> None:
    session, _ = open_session(RpcLimits(max_answers=3))
    for i in range(1, 4):
        session.receive_data(call(i, pull=False))
        (event,) = assert_alive(session)
        assert isinstance(event, Evaluate)
        session.resolve(event.answer_id, i)
    session.data_to_send()
    assert session.table_sizes()["answers"] == 3
    session.receive_data(call(4, pull=False))
    assert_aborted(session, r"peer left more than 3 answers unreleased")


def test_pulled_answers_are_released_implicitly_and_never_fill_the_table() -> None:
    session, _ = open_session(RpcLimits(max_answers=3))
    for i in range(1, 10):
        session.receive_data(call(i, pull=True))
        (event,) = assert_alive(session)
        assert isinstance(event, Evaluate)
        session.resolve(event.answer_id, i)
    assert session.table_sizes()["answers"] == 0


def test_released_answers_free_room_under_max_answers() -> None:
    session, _ = open_session(RpcLimits(max_answers=3))
    session.receive_data(b"".join(call(i, pull=False) for i in range(1, 4)))
    assert len(assert_alive(session)) == 3
    session.receive_data(frame(Release(2, 1)) + call(4, pull=False))
    events = assert_alive(session)
    assert [e.answer_id for e in events if isinstance(e, Evaluate)] == [4]
    assert session.table_sizes()["answers"] == 3


# ---------------------------------------------------------------------------------------------
# write_high_water


def _bytes_queued_in_kernel(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


async def test_write_high_water_bounds_the_send_buffer_when_the_peer_never_reads() -> None:
    high = 128 * 1024
    payload = b"\0" * (64 * 1024)
    frame_size = len(frame(Push(1, 0, ["sink"], [[payload], {}], True)))
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    theirs.sendall(PEER_HELLO)  # the hostile peer says hello, then never reads
    rpc = await connect(ours, None, limits=RpcLimits(write_high_water=high))
    transport = rpc._transport
    assert transport is not None

    async def send() -> object:
        return await rpc.main.sink(payload)

    n = 48  # 3 MiB of arguments in all
    tasks = [asyncio.create_task(send()) for _ in range(n)]
    try:
        peak = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            peak = max(peak, transport.get_write_buffer_size())
        in_kernel = _bytes_queued_in_kernel(theirs)
        questions = rpc.table_sizes()["questions"]
        assert peak <= high + frame_size, (
            f"{peak} bytes buffered in the transport with write_high_water={high} "
            f"({questions} of {n} calls queued, {in_kernel} bytes in the kernel)"
        )
        assert questions < n, "every sender queued its call: none was made to wait"
        assert not any(task.done() for task in tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        theirs.close()
        await rpc.aclose()
        transport.abort()
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The same limits on what this side sends: an error locally, nothing on the wire


@pytest.mark.parametrize(
    ("limits", "value", "error", "pattern"),
    [
        (
            RpcLimits(max_depth=8),
            nest(7, "list"),
            DataCloneError,
            r"^arguments(\[0\])+: nesting deeper than 8 levels$",
        ),
        (
            RpcLimits(max_int_digits=20),
            10**20,
            DataCloneError,
            r"^arguments\[0\]\[0\]: int with more than 20 digits$",
        ),
        (
            RpcLimits(max_int_digits=20),
            -(10**20),
            DataCloneError,
            r"^arguments\[0\]\[0\]: int with more than 20 digits$",
        ),
        (
            RpcLimits(max_collection_len=10),
            list(range(11)),
            DataCloneError,
            r"^arguments\[0\]\[0\]: 11 items is more than the limit of 10$",
        ),
        (
            RpcLimits(max_collection_len=10),
            {f"k{i}": i for i in range(11)},
            DataCloneError,
            r"^arguments\[0\]\[0\]: 11 items is more than the limit of 10$",
        ),
        (
            RpcLimits(max_objects=50),
            [[i] for i in range(30)],
            DataCloneError,
            r"^arguments\[0\]\[0\](\[\d+\])?: more than 50 objects in one value$",
        ),
        (
            RpcLimits(max_exports=2),
            make_functions(3),
            DataCloneError,
            r"^more than 2 capabilities exported at once$",
        ),
        (
            RpcLimits(max_frame_bytes=1024),
            [make_functions(1)[0], b"x" * 2000],
            FrameTooLarge,
            r"^the arguments took \d+ bytes encoded, over the 1024 bytes one message carries",
        ),
    ],
    ids=["depth", "int", "negative-int", "list", "dict", "objects", "exports", "frame"],
)
def test_local_value_over_a_limit_raises_and_sends_nothing(
    limits: RpcLimits, value: object, error: type[Exception], pattern: str
) -> None:
    session, _ = open_session(limits)
    with pytest.raises(error, match=pattern):
        session.push(0, ["f"], ([value], {}), pull=True)
    assert session.data_to_send() == b""
    assert session.table_sizes() == {"exports": 0, "imports": 0, "questions": 0, "answers": 0}
    # Nothing was consumed: the next push is still push 1.
    assert session.push(0, ["f"], ([1], {}), pull=True) == 1
    assert split_frames(session.data_to_send()) == [Push(1, 0, ["f"], [[1], {}], True)]


def test_local_kwargs_over_a_limit_raises_and_sends_nothing() -> None:
    session, _ = open_session(RpcLimits(max_collection_len=10))
    with pytest.raises(
        DataCloneError, match=r"^arguments\[1\]: 11 items is more than the limit of 10$"
    ):
        session.push(0, ["f"], ([], {f"k{i}": i for i in range(11)}), pull=True)
    assert session.data_to_send() == b""


@pytest.mark.parametrize(
    ("limits", "result", "error"),
    [
        (
            RpcLimits(max_frame_bytes=1024),
            b"x" * 2000,
            (
                "workerloader.FrameTooLarge",
                r"^the result took \d+ bytes encoded, over the 1024 bytes one message carries",
            ),
        ),
        (
            RpcLimits(max_depth=8),
            nest(9, "list"),
            ("workerloader.DataCloneError", r"^result(\[0\])+: nesting deeper than 8 levels$"),
        ),
    ],
    ids=["frame", "depth"],
)
def test_result_over_a_limit_is_rejected_not_sent(
    limits: RpcLimits, result: object, error: tuple[str, str]
) -> None:
    session, _ = open_session(limits)
    session.receive_data(call(1))
    (event,) = assert_alive(session)
    assert isinstance(event, Evaluate)
    session.resolve(event.answer_id, result)
    (reject,) = split_frames(session.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.id == 1
    assert reject.error[0] == error[0]
    assert re.match(error[1], reject.error[1]), reject.error[1]
    assert not session.closed


# ---------------------------------------------------------------------------------------------
# File descriptors never travel (§1)


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _read_frames_until(
    sock: socket.socket, done: Callable[[list[Message]], bool]
) -> list[Message]:
    loop = asyncio.get_running_loop()
    buf = b""
    messages: list[Message] = []
    async with asyncio.timeout(5):
        while not done(messages):
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"peer closed early after {messages!r}"
            buf += chunk
            while len(buf) >= 4:
                (size,) = HEADER.unpack_from(buf, 0)
                if len(buf) < 4 + size:
                    break
                messages.append(_wire.decode_message(buf[4 : 4 + size]))
                buf = buf[4 + size :]
    return messages


def double(x: int) -> int:
    return 2 * x


async def test_file_descriptors_sent_with_scm_rights_are_discarded() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    rpc = await connect(ours, double)
    read_end, write_end = os.pipe()
    extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
    passed = [write_end, *extra]
    still_open = [read_end, *passed]
    try:
        before = _open_fd_count()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", passed))]
        # Every frame carries the fds, and the frames are split across several messages.
        theirs.sendmsg([PEER_HELLO], rights)
        push = call(1, 21)
        theirs.sendmsg([push[:7]], rights)
        theirs.sendmsg([push[7:]], rights)
        for fd in passed:  # our copies are gone; only the in-flight ones remain
            os.close(fd)
            still_open.remove(fd)
        messages = await _read_frames_until(
            theirs, lambda m: any(isinstance(x, Resolve) for x in m)
        )
        assert Resolve(1, 42) in messages
        assert _open_fd_count() == before - len(passed)
        # The write end of the pipe no longer exists anywhere: the read end sees EOF.
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""
        assert not rpc.closed
    finally:
        for fd in still_open:
            os.close(fd)
        theirs.close()
        await rpc.aclose()
        await asyncio.sleep(0.01)
