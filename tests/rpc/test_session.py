"""The sans-IO core driven as a whole: two ``Session`` objects in one thread, bytes passed by hand.

Like h11's ``tests/helpers.py``: ``Link.pump`` moves ``data_to_send()`` of each side into
``receive_data()`` of the other until both are quiet, records every flush as a list of decoded
frames, evaluates ``Evaluate`` events synchronously (unless a side holds them back to test
pending answers) and collects ``Returned``/``Raised``/``Closed`` events.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from workerloader.rpc import FrameTooLarge, RpcLimits, RpcTarget, _wire
from workerloader.rpc._core import Closed, Evaluate, Raised, Returned, Session
from workerloader.rpc._dispatch import evaluate
from workerloader.rpc._target import is_local_capability
from workerloader.rpc._wire import Hello, Message, Pull, Push, Reject, Release, Resolve

HEADER = struct.Struct(">I")
EMPTY = {"exports": 0, "imports": 0, "questions": 0, "answers": 0}

# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True, eq=False)
class FakeStub:
    """What a side's codec makes for an import: the session and id, nothing else."""

    session: Session
    import_id: int


class Codec:
    """A ``StubCodec``: RpcTargets and functions are capabilities; our own stubs unwrap."""

    def wrap_import(self, session: Session, import_id: int) -> object:
        return FakeStub(session, import_id)

    def unwrap_import(self, session: Session, value: object) -> int | None:
        if isinstance(value, FakeStub) and value.session is session:
            return value.import_id
        return None

    def is_capability(self, value: object) -> bool:
        return is_local_capability(value) or isinstance(value, FakeStub)

    def answer_ref(self, session: Session, value: object) -> int | None:
        return None


def split_frames(data: bytes) -> list[Message]:
    """Decode a byte string of whole frames (4-byte big-endian length, then msgpack)."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        (size,) = HEADER.unpack_from(data, pos)
        assert pos + 4 + size <= len(data), "trailing partial frame"
        out.append(_wire.decode_message(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return out


class Peer:
    """One side: a ``Session`` plus what it sent, what it was told and what it evaluated."""

    def __init__(
        self, name: str, main: object, *, limits: RpcLimits | None = None, debug: bool = False
    ) -> None:
        self.name = name
        self.session = Session(main, Codec(), limits=limits, debug=debug)
        self.flushes: list[list[Message]] = []  # one entry per non-empty data_to_send()
        self.outcomes: dict[int, Returned | Raised] = {}
        self.closed: list[Closed] = []
        self.evaluated: list[Evaluate] = []
        self.hold = False  # keep Evaluate events in ``held`` instead of answering at once
        self.held: list[Evaluate] = []

    def handle_events(self) -> None:
        while (event := self.session.next_event()) is not None:
            match event:
                case Evaluate():
                    self.evaluated.append(event)
                    if self.hold:
                        self.held.append(event)
                    else:
                        self.answer(event)
                case Returned() | Raised():
                    assert event.question_id not in self.outcomes, "answered twice"
                    self.outcomes[event.question_id] = event
                case Closed():
                    self.closed.append(event)

    def answer(self, event: Evaluate) -> None:
        """Evaluate synchronously and report the outcome to the core."""
        try:
            result = evaluate(event.target, event.path, event.args, event.kwargs, FakeStub)
        except Exception as exc:
            self.session.reject(event.answer_id, exc)
        else:
            self.session.resolve(event.answer_id, result)

    def release_held(self) -> None:
        held, self.held = self.held, []
        for event in held:
            self.answer(event)
        self.handle_events()

    def value(self, question_id: int) -> object:
        outcome = self.outcomes[question_id]
        assert isinstance(outcome, Returned), outcome
        return outcome.value

    def error(self, question_id: int) -> BaseException:
        outcome = self.outcomes[question_id]
        assert isinstance(outcome, Raised), outcome
        return outcome.error


class Link:
    """Two peers joined by an imaginary ordered byte stream."""

    def __init__(self, a: Peer, b: Peer) -> None:
        self.a = a
        self.b = b

    def pump(self) -> None:
        """Pass bytes both ways until neither side has anything to send."""
        for _ in range(1000):
            moved = False
            for src, dst in ((self.a, self.b), (self.b, self.a)):
                src.handle_events()
                data = src.session.data_to_send()
                if data:
                    moved = True
                    src.flushes.append(split_frames(data))
                    dst.session.receive_data(data)
                    dst.handle_events()
            if not moved:
                return
        raise AssertionError("the peers never went quiet")

    def step(self, src: Peer) -> list[Message]:
        """Move one flush from ``src`` to its peer; return its frames."""
        dst = self.b if src is self.a else self.a
        src.handle_events()
        data = src.session.data_to_send()
        frames = split_frames(data)
        if data:
            src.flushes.append(frames)
            dst.session.receive_data(data)
            dst.handle_events()
        return frames


class Table(RpcTarget):
    def __init__(self, name: str) -> None:
        self.name = name

    def list(self) -> list[dict[str, object]]:
        return [{"table": self.name, "id": 1}, {"table": self.name, "id": 2}]

    def count(self) -> int:
        return 2


class Database(RpcTarget):
    def __init__(self) -> None:
        self.opened: list[str] = []

    def table(self, name: str) -> Table:
        self.opened.append(name)
        return Table(name)

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def fail(self, message: str) -> Table:
        raise ValueError(message)

    def subscribe(self, callback: object) -> object:
        return callback


def connected(main_b: object = None, *, hold_b: bool = False) -> Link:
    """A (caller) and B (callee, offering ``main_b``) after the Hello exchange."""
    link = Link(Peer("a", None), Peer("b", main_b if main_b is not None else Database()))
    link.pump()
    link.b.hold = hold_b
    return link


ROWS = [{"table": "users", "id": 1}, {"table": "users", "id": 2}]


# ---------------------------------------------------------------------------------------------
# Hello


def test_each_side_sends_hello_first_and_nothing_else() -> None:
    link = Link(Peer("a", None), Peer("b", Database()))
    hello = Hello(_wire.PROTOCOL_VERSION, 1 << 20)
    assert link.step(link.a) == [hello]
    assert link.step(link.b) == [hello]
    link.pump()
    assert link.a.flushes == [[hello]]
    assert link.b.flushes == [[hello]]
    for peer in (link.a, link.b):
        assert not peer.session.closed
        assert peer.session.version == 1
        assert peer.closed == []
        assert peer.session.table_sizes() == EMPTY


def test_hello_lowers_the_send_limit_to_the_peers_frame_cap() -> None:
    link = Link(Peer("a", None), Peer("b", Database(), limits=RpcLimits(max_frame_bytes=1024)))
    link.pump()
    assert link.b.flushes == [[Hello(1, 1024)]]
    with pytest.raises(
        FrameTooLarge,
        match=r"^the arguments took \d+ bytes encoded, over the 1024 bytes one message carries",
    ):
        link.a.session.push(0, ["add"], ([b"x" * 2000], {}), pull=True)
    assert link.a.session.data_to_send() == b""
    # Within the cap, it still works.
    assert link.a.session.push(0, ["add"], ([1, 2], {}), pull=True) == 1
    link.pump()
    assert link.a.value(1) == 3


# ---------------------------------------------------------------------------------------------
# A plain call


def test_plain_call_is_one_push_and_one_resolve() -> None:
    link = connected()
    q = link.a.session.push(0, ["add"], ([2, 3], {}), pull=True)
    assert q == 1
    link.pump()
    assert link.a.flushes[1:] == [[Push(1, 0, ["add"], [[2, 3], {}], True)]]
    assert link.b.flushes[1:] == [[Resolve(1, 5)]]
    assert link.a.value(1) == 5
    assert link.a.session.table_sizes() == EMPTY
    assert link.b.session.table_sizes() == EMPTY


def test_plain_call_with_keyword_arguments() -> None:
    link = connected()
    q = link.a.session.push(0, ["add"], ([2], {"b": 40}), pull=True)
    link.pump()
    assert link.a.value(q) == 42
    (evaluate_event,) = link.b.evaluated
    assert evaluate_event.args == [2]
    assert evaluate_event.kwargs == {"b": 40}


def test_property_read_is_a_push_without_args() -> None:
    link = connected()
    q = link.a.session.push(0, ["table"], None, pull=True)
    link.pump()
    assert link.a.flushes[1] == [Push(1, 0, ["table"], None, True)]
    # The bound method is not data: it crosses as a capability (a stub on A).
    stub = link.a.value(q)
    assert isinstance(stub, FakeStub)
    assert stub.import_id == -1
    assert link.b.session.table_sizes()["exports"] == 1


def test_plain_call_that_raises_is_rejected_and_the_session_goes_on() -> None:
    link = connected()
    q = link.a.session.push(0, ["fail"], (["boom"], {}), pull=True)
    link.pump()
    assert link.b.flushes[1:] == [[Reject(1, ("ValueError", "boom", None))]]
    error = link.a.error(q)
    assert type(error) is ValueError
    assert error.args == ("boom",)
    q2 = link.a.session.push(0, ["add"], ([1, 1], {}), pull=True)
    link.pump()
    assert link.a.value(q2) == 2
    assert link.a.closed == []
    assert link.b.closed == []


def test_unreachable_name_is_rejected_with_attribute_error() -> None:
    link = connected()
    q = link.a.session.push(0, ["_private"], ([], {}), pull=True)
    link.pump()
    error = link.a.error(q)
    assert type(error) is AttributeError
    assert str(error) == "'Database' object has no RPC member '_private'"
    assert not link.b.session.closed


# ---------------------------------------------------------------------------------------------
# Pipelining


def test_pipelined_chain_is_one_flush_each_way() -> None:
    link = connected()
    a = link.a.session
    first = a.push(0, ["table"], (["users"], {}), pull=False)
    second = a.push(first, ["list"], ([], {}), pull=True)
    a.release_question(first)  # the intermediate promise was dropped
    assert (first, second) == (1, 2)
    sent = link.step(link.a)
    assert sent == [
        Push(1, 0, ["table"], [["users"], {}], False),
        Push(2, 1, ["list"], [[], {}], True),
        Release(1, 1),
    ]
    replies = link.step(link.b)
    assert replies == [Resolve(2, ROWS)]
    assert link.a.value(2) == ROWS
    assert 1 not in link.a.outcomes
    link.pump()
    # Nothing more went either way.
    assert link.a.flushes[1:] == [sent]
    assert link.b.flushes[1:] == [replies]
    assert a.table_sizes() == EMPTY
    assert link.b.session.table_sizes() == EMPTY


def test_pipelined_chain_without_early_release() -> None:
    link = connected()
    a = link.a.session
    first = a.push(0, ["table"], (["users"], {}), pull=False)
    second = a.push(first, ["count"], ([], {}), pull=True)
    sent = link.step(link.a)
    assert [type(m) for m in sent] == [Push, Push]
    assert link.step(link.b) == [Resolve(second, 2)]
    assert link.b.session.table_sizes()["answers"] == 1  # answer 1 still pipelinable
    third = a.push(first, ["list"], ([], {}), pull=True)
    link.pump()
    assert link.a.value(third) == ROWS
    assert link.b.session.table_sizes()["answers"] == 1
    assert link.b.evaluated[0].path == ["table"]
    assert len(link.b.evaluated) == 3
    assert link.b.session.table_sizes()["exports"] == 0  # the Table never crossed


def test_pipelined_push_waits_for_a_pending_answer() -> None:
    link = connected(hold_b=True)
    a = link.a.session
    first = a.push(0, ["table"], (["users"], {}), pull=False)
    second = a.push(first, ["list"], ([], {}), pull=True)
    a.release_question(first)
    link.pump()
    # B has started only the first push; the second waits for its target.
    assert [e.answer_id for e in link.b.evaluated] == [1]
    assert link.b.session.running == 1
    assert link.a.outcomes == {}
    link.b.release_held()  # answers 1, which starts 2 (held too)
    assert [e.answer_id for e in link.b.evaluated] == [1, 2]
    link.b.release_held()
    link.pump()
    assert link.a.value(second) == ROWS
    assert link.b.session.table_sizes() == EMPTY


def test_reject_propagates_to_a_pipelined_call() -> None:
    link = connected()
    a = link.a.session
    first = a.push(0, ["fail"], (["no such table"], {}), pull=False)
    second = a.push(first, ["list"], ([], {}), pull=True)
    a.release_question(first)
    link.pump()
    # Only the pulled push is answered, with the error of the push it was built on.
    assert link.b.flushes[1:] == [[Reject(second, ("ValueError", "no such table", None))]]
    error = link.a.error(second)
    assert type(error) is ValueError
    assert error.args == ("no such table",)
    assert [e.answer_id for e in link.b.evaluated] == [1]  # "list" was never evaluated
    assert link.b.session.table_sizes() == EMPTY
    assert a.table_sizes() == EMPTY


def test_reject_propagates_to_a_pipelined_call_sent_after_the_failure() -> None:
    link = connected()
    a = link.a.session
    first = a.push(0, ["fail"], (["gone"], {}), pull=False)
    link.pump()
    assert link.b.flushes[1:] == []  # nothing is sent for an unpulled push
    second = a.push(first, ["list"], ([], {}), pull=True)
    third = a.push(first, ["count"], ([], {}), pull=False)
    fourth = a.push(third, ["anything"], None, pull=True)
    link.pump()
    for q in (second, fourth):
        error = link.a.error(q)
        assert type(error) is ValueError
        assert error.args == ("gone",)


def test_reject_propagates_through_a_pending_chain() -> None:
    link = connected(hold_b=True)
    a = link.a.session
    first = a.push(0, ["table"], (["users"], {}), pull=False)
    second = a.push(first, ["missing"], ([], {}), pull=False)
    third = a.push(second, ["list"], ([], {}), pull=True)
    link.pump()
    link.b.hold = False
    link.b.release_held()
    link.pump()
    error = link.a.error(third)
    assert type(error) is AttributeError
    assert str(error) == "'Table' object has no RPC member 'missing'"


def test_pipelining_on_a_pulled_question_is_refused_locally() -> None:
    link = connected()
    a = link.a.session
    q = a.push(0, ["table"], (["users"], {}), pull=True)
    with pytest.raises(ValueError, match=rf"^question {q} cannot be pipelined on$"):
        a.push(q, ["list"], ([], {}), pull=True)
    with pytest.raises(ValueError, match=r"^question 99 cannot be pipelined on$"):
        a.push(99, ["list"], ([], {}), pull=True)
    assert split_frames(a.data_to_send()) == [Push(1, 0, ["table"], [["users"], {}], True)]


# ---------------------------------------------------------------------------------------------
# Pull


def test_pull_of_an_unpulled_push_after_it_finished() -> None:
    link = connected()
    a = link.a.session
    q = a.push(0, ["add"], ([20, 22], {}), pull=False)
    link.pump()
    assert link.b.flushes[1:] == []
    assert link.a.outcomes == {}
    assert link.b.session.table_sizes()["answers"] == 1
    a.pull(q)
    assert link.step(link.a) == [Pull(q)]
    assert link.step(link.b) == [Resolve(q, 42)]
    assert link.a.value(q) == 42
    # A push sent unpulled is released explicitly, after the Resolve the Pull brought.
    assert link.step(link.a) == [Release(q, 1)]
    assert a.table_sizes() == EMPTY
    assert link.b.session.table_sizes() == EMPTY


def test_pull_of_an_unpulled_push_still_running() -> None:
    link = connected(hold_b=True)
    a = link.a.session
    q = a.push(0, ["add"], ([1, 2], {}), pull=False)
    link.pump()
    a.pull(q)
    a.pull(q)  # pulling twice sends one Pull
    assert link.step(link.a) == [Pull(q)]
    assert link.step(link.b) == []
    link.b.release_held()
    link.pump()
    assert link.a.value(q) == 3
    assert link.b.flushes[1:] == [[Resolve(q, 3)]]
    assert link.a.flushes[-1] == [Release(q, 1)]
    assert link.b.session.table_sizes() == EMPTY


def test_pull_of_a_failed_unpulled_push_is_rejected() -> None:
    link = connected()
    a = link.a.session
    q = a.push(0, ["fail"], (["late"], {}), pull=False)
    link.pump()
    a.pull(q)
    link.pump()
    error = link.a.error(q)
    assert type(error) is ValueError
    assert error.args == ("late",)
    assert link.b.session.table_sizes() == EMPTY
    assert a.table_sizes() == EMPTY


def test_pull_of_a_released_question_is_refused_locally() -> None:
    link = connected()
    a = link.a.session
    q = a.push(0, ["add"], ([1, 2], {}), pull=False)
    a.release_question(q)
    with pytest.raises(ValueError, match=rf"^question {q} was released$"):
        a.pull(q)


# ---------------------------------------------------------------------------------------------
# Release


def test_release_of_unpulled_questions_shrinks_the_peers_answers_table() -> None:
    link = connected()
    a = link.a.session
    questions = [a.push(0, ["table"], ([f"t{i}"], {}), pull=False) for i in range(3)]
    link.pump()
    assert link.b.session.table_sizes()["answers"] == 3
    assert a.table_sizes()["questions"] == 3
    a.release_question(questions[1])
    assert link.step(link.a) == [Release(questions[1], 1)]
    assert link.b.session.table_sizes()["answers"] == 2
    assert a.table_sizes()["questions"] == 2
    # A released question can no longer be pipelined on; the others still can.
    with pytest.raises(ValueError, match=rf"^question {questions[1]} cannot be pipelined on$"):
        a.push(questions[1], ["count"], ([], {}), pull=True)
    q = a.push(questions[2], ["count"], ([], {}), pull=True)
    link.pump()
    assert link.a.value(q) == 2
    for question in (questions[0], questions[2]):
        a.release_question(question)
    link.pump()
    assert link.b.session.table_sizes() == EMPTY
    assert a.table_sizes() == EMPTY
    assert link.b.closed == []


def test_release_of_a_pulled_question_is_a_no_op() -> None:
    link = connected(hold_b=True)
    a = link.a.session
    q = a.push(0, ["add"], ([1, 2], {}), pull=True)
    link.pump()
    a.release_question(q)
    assert a.data_to_send() == b""
    link.b.release_held()
    link.pump()
    assert link.a.value(q) == 3


def test_release_of_an_answer_still_running_discards_it_when_done() -> None:
    link = connected(hold_b=True)
    a = link.a.session
    q = a.push(0, ["table"], (["users"], {}), pull=False)
    a.release_question(q)
    link.pump()
    assert link.b.session.table_sizes()["answers"] == 0
    assert link.b.session.running == 1
    link.b.release_held()
    link.pump()
    assert link.b.session.running == 0
    assert link.b.flushes[1:] == []  # nothing goes back for a released answer
    assert link.b.session.table_sizes() == EMPTY


def test_pulled_answers_are_released_implicitly() -> None:
    link = connected(hold_b=True)
    a = link.a.session
    questions = [a.push(0, ["add"], ([i, i], {}), pull=True) for i in range(5)]
    link.pump()
    assert link.b.session.table_sizes()["answers"] == 5
    assert a.table_sizes()["questions"] == 5
    link.b.release_held()
    link.pump()
    assert [link.a.value(q) for q in questions] == [0, 2, 4, 6, 8]
    assert link.b.session.table_sizes()["answers"] == 0
    assert a.table_sizes()["questions"] == 0
    # No Release was needed for them.
    assert not any(isinstance(m, Release) for flush in link.a.flushes for m in flush)


def test_pulled_answer_cannot_be_pipelined_on_by_the_peer() -> None:
    # A (misbehaving) peer that pipelines on a pulled, answered push breaks the protocol.
    link = connected()
    a = link.a.session
    a.push(0, ["add"], ([1, 2], {}), pull=True)
    link.pump()
    link.b.session.receive_data(_wire.encode_frame(Push(2, 1, ["x"], None, True)))
    link.b.handle_events()
    (closed,) = link.b.closed
    assert str(closed.error) == "session aborted: push on unknown or released answer 1"


# ---------------------------------------------------------------------------------------------
# Capabilities in values


def test_callback_is_exported_called_back_and_released() -> None:
    link = connected(main_b=Database())
    a = link.a.session
    calls: list[object] = []

    def on_event(x: object) -> str:
        calls.append(x)
        return f"got {x}"

    q = a.push(0, ["subscribe"], ([on_event], {}), pull=True)
    link.pump()
    assert link.a.flushes[1] == [Push(1, 0, ["subscribe"], [[{20: -1}], {}], True)]
    assert a.table_sizes()["exports"] == 1
    stub = link.a.value(q)
    # B returned A's own capability: it arrives as the original function.
    assert stub is on_event
    imported = link.b.evaluated[0].args
    assert imported is not None
    (b_stub,) = imported
    assert isinstance(b_stub, FakeStub)
    assert b_stub.import_id == -1
    # B calls it back.
    b = link.b.session
    q_b = b.push(-1, [], (["ping"], {}), pull=True)
    link.pump()
    assert calls == ["ping"]
    assert link.b.value(q_b) == "got ping"
    # B drops its stub: one Release with the number of introductions.
    b.release_import(-1)
    assert link.step(link.b) == [Release(-1, 1)]
    assert a.table_sizes() == EMPTY
    assert b.table_sizes() == EMPTY


def test_same_capability_sent_twice_is_one_export_released_with_the_full_count() -> None:
    link = connected()
    a = link.a.session

    def f() -> None:
        return None

    q1 = a.push(0, ["subscribe"], ([f], {}), pull=True)
    q2 = a.push(0, ["subscribe"], ([f], {}), pull=True)
    link.pump()
    assert link.a.value(q1) is f
    assert link.a.value(q2) is f
    assert a.table_sizes()["exports"] == 1
    b = link.b.session
    assert b.table_sizes()["imports"] == 1
    b.release_import(-1)
    assert b.table_sizes()["imports"] == 1  # another local stub is live
    b.release_import(-1)
    assert link.step(link.b) == [Release(-1, 2)]
    assert a.table_sizes() == EMPTY
    assert b.table_sizes() == EMPTY


def test_a_push_read_with_a_violation_in_the_same_chunk_never_runs() -> None:
    from workerloader.rpc import _wire
    from workerloader.rpc._core import Closed, Evaluate, Session
    from workerloader.rpc._wire import Hello, Push

    class Codec:
        def wrap_import(self, session: Session, import_id: int) -> object:
            return import_id

        def unwrap_import(self, session: Session, value: object) -> int | None:
            return None

        def is_capability(self, value: object) -> bool:
            return False

        def answer_ref(self, session: Session, value: object) -> int | None:
            return None

    session = Session(lambda: None, Codec())
    chunk = (
        _wire.encode_frame(Hello(1, 1 << 20))
        + _wire.encode_frame(Push(1, 0, [], [[], {}], True))
        + _wire.encode_frame(Push(7, 0, [], [[], {}], True))  # out of sequence: abort
    )
    session.receive_data(chunk)
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    assert not any(isinstance(e, Evaluate) for e in events)
    assert isinstance(events[-1], Closed)
