"""A bounded fuzz of everything that reads what a hostile peer sends.

(a) ``decode_message`` on arbitrary bytes, (b) ``decode_value`` on arbitrary msgpack-shaped trees,
(c) a whole ``Session`` on random frames after a valid Hello. The only failure any of them may
show is ``ProtocolError`` (a ``Closed`` event for the session); nothing else escapes and nothing
hangs.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workerloader import ProtocolError, SessionClosed
from workerloader.rpc import _wire
from workerloader.rpc._clone import decode_value
from workerloader.rpc._core import Closed, Evaluate, Event, Raised, Returned, Session
from workerloader.rpc._limits import RpcLimits

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LIMITS = RpcLimits()
TIGHT = RpcLimits(max_depth=3, max_collection_len=4, max_objects=16, max_int_digits=20)

MESSAGE_TYPES = (
    _wire.Hello,
    _wire.Push,
    _wire.Pull,
    _wire.Resolve,
    _wire.Reject,
    _wire.Release,
    _wire.Abort,
)


def fuzz_import(tag: int, cap_id: int) -> object:
    assert tag in (20, 21, 22)  # export, import, answer (protocol §4)
    assert type(cap_id) is int
    return ("capability", tag, cap_id)


# ---------------------------------------------------------------------------------------------
# Strategies: msgpack-shaped trees, biased towards the tagged forms of §4

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-3, max_value=30),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=20),
)

# Payloads that get past the type checks of tagged scalars, so the parsers themselves are fuzzed.
plausible_payloads = st.one_of(
    st.sampled_from(
        [
            "2024-01-02",
            "2024-01-02T03:04:05",
            "2024-01-02T03:04:05.123456+05:30",
            "03:04:05-01:00",
            "24:00",
            "1e999999999",
            "sNaN",
            "-Infinity",
            "123456789012345678901234567890",
            "-0",
            "0x10",
            "1_000",
            " 7 ",
            "",
        ]
    ),
    st.from_regex(r"\A[0-9T:+\-.Z eE]{0,30}\Z"),
    st.binary(min_size=16, max_size=16),
    st.text(min_size=16, max_size=16),
    st.lists(st.integers(min_value=0, max_value=255), min_size=16, max_size=16),
    st.lists(
        st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats()),
        min_size=3,
        max_size=3,
    ),
    st.integers(min_value=-2, max_value=12),
)

tags = st.sampled_from([0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 99, -1])


def _branches(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.dictionaries(st.integers(min_value=-3, max_value=25), inner, max_size=3),
        st.dictionaries(st.text(max_size=3) | st.integers(-2, 2), inner, max_size=3),
        st.builds(lambda tag, payload: {tag: payload}, tags, inner | plausible_payloads),
    )


tagged_scalars = st.builds(
    lambda tag, payload: {tag: payload},
    st.sampled_from([5, 7, 8, 9, 10, 11, 12, 13]),
    plausible_payloads,
)

trees = st.recursive(leaves | plausible_payloads | tagged_scalars, _branches, max_leaves=30)


# ---------------------------------------------------------------------------------------------
# (a) decode_message on arbitrary bytes


def valid_message_bodies() -> st.SearchStrategy[bytes]:
    errors = st.tuples(st.text(max_size=8), st.text(max_size=8), st.none() | st.text(max_size=8))
    small = st.integers(min_value=-3, max_value=8)
    messages = st.one_of(
        st.builds(_wire.Hello, small, small),
        st.builds(
            _wire.Push,
            small,
            small,
            st.lists(st.text(max_size=4) | small, max_size=3),
            trees,
            st.booleans(),
        ),
        st.builds(_wire.Pull, small),
        st.builds(_wire.Resolve, small, trees),
        st.builds(_wire.Reject, small, errors),
        st.builds(_wire.Release, small, small),
        st.builds(_wire.Abort, errors),
    )
    return messages.map(lambda m: _wire.encode_frame(m)[4:])


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """A body with a few bytes overwritten, inserted or cut off."""
    body = bytearray(draw(bodies))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        pos = draw(st.integers(min_value=0, max_value=len(body)))
        byte = draw(st.integers(min_value=0, max_value=255))
        action = draw(st.sampled_from(["set", "insert", "truncate"]))
        if action == "set" and pos < len(body):
            body[pos] = byte
        elif action == "insert":
            body.insert(pos, byte)
        else:
            del body[pos:]
    return bytes(body)


# A msgpack str (fixstr) whose bytes need not be UTF-8, in a Resolve value or a Reject message.
raw_strs = st.binary(max_size=31).map(lambda b: bytes([0xA0 | len(b)]) + b)
bodies_with_raw_strs = st.one_of(
    raw_strs.map(lambda s: b"\x93\x03\x01" + s),
    raw_strs.map(lambda s: b"\x93\x04\x01\x93\xa1E" + s + b"\xc0"),
    raw_strs.map(lambda s: b"\x93\x03\x01\x92\x01" + s),
)

message_bodies = st.one_of(
    st.binary(max_size=256),
    bodies_with_raw_strs,
    # Arrays that start like a message: a kind, then random fields.
    st.builds(
        lambda kind, fields: msgspec.msgpack.encode([kind, *fields]),
        st.integers(min_value=-1, max_value=8),
        st.lists(trees, max_size=6),
    ),
    valid_message_bodies(),
    mutated(valid_message_bodies()),
)


@pytest.mark.timeout(60)
@FUZZ
@given(message_bodies)
def test_decode_message_returns_a_message_or_raises_protocol_error(body: bytes) -> None:
    try:
        message = _wire.decode_message(body)
    except ProtocolError:
        return
    assert isinstance(message, MESSAGE_TYPES)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "invalid message from peer: Input data was truncated"),
        (b"\x91\x07", "invalid message from peer: Invalid value 7 - at `$[0]`"),
        (
            msgspec.msgpack.encode([3, 1, msgspec.msgpack.Ext(1, b"x")]),
            "invalid message from peer: msgpack extension type 1",
        ),
        (
            b"\x93\x03\x01\xdd\xff\xff\xff\xff",
            "invalid message from peer: Input data was truncated",
        ),
    ],
    ids=["empty", "unknown-kind", "extension", "huge-array-header"],
)
def test_decode_message_refusals(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match="^" + re.escape(message) + "$"):
        _wire.decode_message(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\x93\x03\x01\xa1\x80",  # Resolve(1, <str of byte 0x80>)
        b"\x93\x04\x01\x93\xa1\x80\xa1a\xc0",  # Reject(1, [<bad str>, "a", nil])
        b"\x96\x01\x01\x00\x91\xa1\x80\xc0\xc3",  # Push(1, 0, [<bad str>], nil, true)
        b"\x93\x03\x01\x81\xa1\x80\x01",  # Resolve(1, {<bad str>: 1})
    ],
    ids=["resolve-value", "reject-error", "push-path", "map-key"],
)
def test_invalid_utf8_in_a_str_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"^invalid message from peer: "):
        _wire.decode_message(body)


def test_deeply_nested_message_is_refused_without_crashing() -> None:
    body = b"\x93\x03\x01" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolError, match=r"^invalid message from peer: "):
        _wire.decode_message(body)


def test_trailing_fields_are_ignored() -> None:
    """§8: receivers ignore trailing fields they do not know."""
    message = _wire.decode_message(msgspec.msgpack.encode([2, 5, "future", [1]]))
    assert message == _wire.Pull(5)


# ---------------------------------------------------------------------------------------------
# (b) decode_value on arbitrary trees


def assert_decodes_or_refuses(tree: object, limits: RpcLimits) -> None:
    refusal: ProtocolError | None = None
    try:
        decode_value(tree, fuzz_import, limits)
    except ProtocolError as exc:
        refusal = exc
    if refusal is not None:
        assert str(refusal).startswith("invalid value")


@pytest.mark.timeout(60)
@FUZZ
@given(trees, st.sampled_from([LIMITS, TIGHT]))
def test_decode_value_returns_or_raises_protocol_error(tree: object, limits: RpcLimits) -> None:
    assert_decodes_or_refuses(tree, limits)


@pytest.mark.timeout(60)
@FUZZ
@given(trees)
def test_decode_value_after_msgpack_returns_or_raises_protocol_error(tree: object) -> None:
    """The same, on the tree as msgspec hands it over from a real Resolve frame."""
    frame = _wire.encode_frame(_wire.Resolve(1, tree))
    message = _wire.decode_message(frame[4:])
    assert isinstance(message, _wire.Resolve)
    assert_decodes_or_refuses(message.value, LIMITS)


@pytest.mark.parametrize(
    "tree",
    [
        {0: 0},
        [{0: 1}],
        {2: [{0: 0}]},
        {3: [{0: 0}]},
        {1: [{2: [1]}, {0: 1}, {0: 0}, 1]},
        {1: [[], 1]},
        {3: [[]]},
        {4: [{}]},
        {1: [1]},
        {1: "ab"},
        {2: "ab"},
        {5: "not bytes"},
        {7: "12a"},
        {7: 12},
        {8: "yesterday"},
        {9: b"2024-01-01"},
        {10: 1},
        {11: [1, 2]},
        {11: [2**63, 0, 0]},
        {11: ["a", 0, 0]},
        {11: [float("nan"), 0, 0]},
        {12: "one"},
        {13: b"short"},
        {13: "0123456789abcdef"},
        {13: [0] * 16},
        {20: "x"},
        {21: None},
        {6: 1},
        {99: 1},
        {"a": 1, 2: 3},
        {1: 2, 3: 4},
        {b"k": 1},
        [[[[[[]]]]]],
        [0, 1, 2, 3, 4],
    ],
)
def test_decode_value_refuses_malformed_trees(tree: object) -> None:
    with pytest.raises(ProtocolError, match=r"^invalid value"):
        decode_value(tree, fuzz_import, TIGHT)


def test_decode_value_is_iterative_on_deep_trees() -> None:
    tree: object = None
    for _ in range(100_000):
        tree = [tree]
    with pytest.raises(
        ProtocolError, match=r"^invalid value from peer: nesting deeper than 64 levels$"
    ):
        decode_value(tree, fuzz_import, LIMITS)


# ---------------------------------------------------------------------------------------------
# (c) a whole Session on random frames


class FuzzStub:
    __slots__ = ("import_id", "session")

    def __init__(self, session: Session, import_id: int) -> None:
        self.session = session
        self.import_id = import_id


class FuzzStubCodec:
    """The least a driver must provide: stubs are plain objects, functions are capabilities."""

    def wrap_import(self, session: Session, import_id: int) -> object:
        return FuzzStub(session, import_id)

    def unwrap_import(self, session: Session, value: object) -> int | None:
        if isinstance(value, FuzzStub) and value.session is session:
            return value.import_id
        return None

    def is_capability(self, value: object) -> bool:
        return callable(value)

    def answer_ref(self, session: Session, value: object) -> int | None:
        return None


class Main:
    """Offered as target 0; not clonable, so resolving with it exercises the Reject path."""


def callback() -> None:
    pass


def hello_frame() -> bytes:
    return _wire.encode_frame(_wire.Hello(_wire.PROTOCOL_VERSION, LIMITS.max_frame_bytes))


small_ids = st.integers(min_value=-3, max_value=6)
error_names = st.sampled_from(
    [
        "ValueError",
        "KeyError",
        "UnicodeDecodeError",
        "ExceptionGroup",
        "StopIteration",
        "SystemExit",
        "BaseException",
        "OSError",
        "workerloader.DataCloneError",
        "workerloader.FrameTooLarge",
        "mymodule.MyError",
        "",
    ]
) | st.text(max_size=10)
wire_errors = st.tuples(error_names, st.text(max_size=10), st.none() | st.text(max_size=10))
arguments = st.one_of(
    st.none(),
    st.builds(
        lambda args, kwargs: [args, kwargs],
        st.lists(trees, max_size=3),
        st.dictionaries(st.text(max_size=4), trees, max_size=2),
    ),
    trees,
)
session_messages = st.one_of(
    st.builds(
        _wire.Push,
        st.integers(min_value=0, max_value=5),
        small_ids,
        st.lists(st.text(max_size=4) | st.integers(-1, 3), max_size=3),
        arguments,
        st.booleans(),
    ),
    st.builds(_wire.Pull, small_ids),
    st.builds(_wire.Resolve, small_ids, trees),
    st.builds(_wire.Reject, small_ids, wire_errors),
    st.builds(_wire.Release, small_ids, st.integers(min_value=-2, max_value=3)),
    st.builds(_wire.Abort, wire_errors),
    st.builds(_wire.Hello, st.integers(min_value=-1, max_value=3), small_ids),
)
frames = st.one_of(
    session_messages.map(_wire.encode_frame),
    session_messages.map(_wire.encode_frame),  # weighted: most frames are well formed
    message_bodies.filter(bool).map(lambda body: _wire.HEADER.pack(len(body)) + body),
    st.binary(min_size=1, max_size=12),  # garbage, including absurd length prefixes
)


def split_frames(data: bytes) -> list[_wire.Message]:
    """Decode a whole outgoing byte stream into its messages."""
    messages: list[_wire.Message] = []
    pos = 0
    while pos < len(data):
        (size,) = _wire.HEADER.unpack_from(data, pos)
        messages.append(_wire.decode_message(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    assert pos == len(data)
    return messages


def check_events(session: Session, seen: list[Event]) -> None:
    while (event := session.next_event()) is not None:
        assert not any(isinstance(e, Closed) for e in seen), "an event followed Closed"
        assert isinstance(event, Evaluate | Returned | Raised | Closed)
        if isinstance(event, Closed):
            assert isinstance(event.error, SessionClosed)
        if isinstance(event, Raised):
            assert isinstance(event.error, BaseException)
        seen.append(event)


@pytest.mark.timeout(60)
@FUZZ
@given(st.lists(frames, min_size=1, max_size=8), st.data())
def test_session_never_raises_from_receive_data(chunks: list[bytes], data: st.DataObject) -> None:
    session = Session(Main(), FuzzStubCodec(), limits=LIMITS)
    seen: list[Event] = []
    session.receive_data(hello_frame())
    # Give the peer something to answer and release: a pulled call that exports a capability (-1),
    # an unpulled one, and a pulled pipelined one.
    assert session.push(0, ["call"], ([callback, 1], {}), pull=True) == 1
    assert session.push(0, ["get"], None, pull=False) == 2
    assert session.push(2, ["more"], ([], {"k": "v"}), pull=True) == 3
    assert session.table_sizes()["exports"] == 1
    assert isinstance(session.data_to_send(), bytes)
    check_events(session, seen)
    assert seen == []

    stream = b"".join(chunks)
    answered: set[int] = set()
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(min_value=1, max_value=len(stream) - pos), label="chunk")
        session.receive_data(stream[pos : pos + step])
        pos += step
        check_events(session, seen)
        for event in [e for e in seen if isinstance(e, Evaluate)]:
            if event.answer_id in answered or session.closed:
                continue
            if not data.draw(st.booleans(), label="answer now"):
                continue
            answered.add(event.answer_id)
            outcome = data.draw(st.sampled_from(["args", "target", "reject"]), label="outcome")
            if outcome == "args":
                session.resolve(event.answer_id, [event.args, event.kwargs])
            elif outcome == "target":
                session.resolve(event.answer_id, event.target)
            else:
                session.reject(event.answer_id, ValueError("no"))
        split_frames(session.data_to_send())  # whatever the session sends is well formed
        check_events(session, seen)
        assert session.closed == any(isinstance(e, Closed) for e in seen)

    session.receive_eof()
    check_events(session, seen)
    assert session.closed
    assert sum(isinstance(e, Closed) for e in seen) == 1


def test_session_aborts_on_garbage_after_hello() -> None:
    session = Session(Main(), FuzzStubCodec(), limits=LIMITS)
    session.receive_data(hello_frame() + b"\x00\x00\x00\x02\xc1\xc1")
    event = session.next_event()
    assert isinstance(event, Closed)
    reason = (
        "invalid message from peer: MessagePack data is malformed: invalid opcode '\\xc1' (byte 0)"
    )
    assert str(event.error) == f"session aborted: {reason}"
    assert session.next_event() is None
    sent = split_frames(session.data_to_send())
    assert isinstance(sent[0], _wire.Hello)
    assert isinstance(sent[-1], _wire.Abort)
    assert sent[-1].error[1] == reason


def test_session_aborts_on_an_oversized_length_prefix_before_the_body() -> None:
    session = Session(Main(), FuzzStubCodec(), limits=LIMITS)
    session.receive_data(hello_frame() + b"\xff\xff\xff\xff")
    event = session.next_event()
    assert isinstance(event, Closed)
    assert "exceeds the limit of 1048576" in str(event.error)


def test_session_aborts_on_a_release_of_a_negative_count() -> None:
    """§2 Release: the peer drops ``refcount`` references it was given. A negative count is a
    protocol violation; accepting it silently lets a peer inflate an export's count instead."""
    session = Session(Main(), FuzzStubCodec(), limits=LIMITS)
    session.receive_data(hello_frame())
    session.push(0, ["call"], ([callback], {}), pull=True)
    session.receive_data(_wire.encode_frame(_wire.Release(-1, -5)))
    assert session.closed
    event = session.next_event()
    assert isinstance(event, Closed)
    assert "invalid release of capability -1" in str(event.error)


def open_session() -> Session:
    session = Session(Main(), FuzzStubCodec(), limits=LIMITS)
    session.receive_data(hello_frame())
    assert session.next_event() is None
    return session


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x00\x00\x05\x93\x03\x01\xa1\x80",  # invalid UTF-8 in a str
        _wire.encode_frame(_wire.Push(1, 0, ["f"], [[{13: "0123456789abcdef"}], {}], True)),
        _wire.encode_frame(_wire.Push(1, 0, ["f"], [[{13: [0] * 16}], {}], True)),
    ],
    ids=["invalid-utf8", "uuid-from-str", "uuid-from-list"],
)
def test_session_turns_hostile_frames_into_closed(frame: bytes) -> None:
    session = open_session()
    session.receive_data(frame)  # must not raise
    assert session.closed
    event = session.next_event()
    assert isinstance(event, Closed)
    assert str(event.error).startswith("session aborted: invalid ")
    assert isinstance(split_frames(session.data_to_send())[-1], _wire.Abort)
