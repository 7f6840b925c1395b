"""The sans-IO protocol core: bytes in, events and bytes out (``docs/protocol.md``).

``Session`` imports no asyncio, reads no clock and touches no socket. A driver feeds it what
arrives (``receive_data``), takes what must be sent (``data_to_send``), handles the events it
produces (``next_event``), and reports the outcome of evaluations back (``resolve`` / ``reject``).
Both peers of a session can be driven in one thread by passing bytes between them.
"""

from __future__ import annotations

import builtins
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Protocol

from .._errors import (
    BindingError,
    DataCloneError,
    FrameTooLarge,
    PermissionDenied,
    ProtocolError,
    QuotaExceeded,
    RemoteError,
    SessionClosed,
    SubrequestLimitExceeded,
    WorkerloaderError,
)
from . import _wire
from ._clone import T_ANSWER, T_EXPORT, T_IMPORT, decode_value, encode_value, flat_scalars
from ._limits import RpcLimits
from ._wire import Abort, Hello, Message, Pull, Push, Reject, Release, Resolve

__all__ = [
    "Closed",
    "Evaluate",
    "Event",
    "Raised",
    "Returned",
    "Session",
    "StubCodec",
]


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Evaluate:
    """The peer asks this side to evaluate ``path`` on ``target`` and, if ``args`` is not None,
    call the result with ``args``/``kwargs``. Report the outcome with ``Session.resolve`` or
    ``Session.reject`` for ``answer_id``, exactly once."""

    answer_id: int
    target: object
    path: list[str | int]
    args: list[object] | None
    kwargs: dict[str, object]


@dataclass(frozen=True, slots=True)
class Returned:
    """A pulled push of ours succeeded."""

    question_id: int
    value: object


@dataclass(frozen=True, slots=True)
class Raised:
    """A pulled push of ours failed; ``error`` is ready to raise."""

    question_id: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended; ``error`` says why. No event follows."""

    error: SessionClosed


Event = Evaluate | Returned | Raised | Closed


class StubCodec(Protocol):
    """How the driver's stub objects map to import ids; the core never creates stubs itself."""

    def wrap_import(self, session: Session, import_id: int) -> object:
        """Make a new local stub for the peer's export ``import_id``."""
        ...

    def unwrap_import(self, session: Session, value: object) -> int | None:
        """The import id if ``value`` is a live stub of ``session``, else None."""
        ...

    def is_capability(self, value: object) -> bool:
        """True if ``value`` is exported by reference when sent (RpcTarget, function, stub)."""
        ...

    def answer_ref(self, session: Session, value: object) -> int | None:
        """If ``value`` is an unawaited promise of ``session``, send it (unpulled) and return
        its question id: it travels as a reference to the peer's answer (pipelining in
        arguments). None for anything else."""
        ...


# ---------------------------------------------------------------------------------------------
# Errors that cross (protocol §6)

_CROSSABLE: Final[dict[str, type[BaseException]]] = {
    "workerloader.DataCloneError": DataCloneError,
    "workerloader.FrameTooLarge": FrameTooLarge,
    "workerloader.PermissionDenied": PermissionDenied,
    "workerloader.BindingError": BindingError,
    "workerloader.QuotaExceeded": QuotaExceeded,
    "workerloader.SubrequestLimitExceeded": SubrequestLimitExceeded,
}
_RECEIVED_AS: dict[str, type[BaseException]] = {}


def receive_error_as(name: str, cls: type[BaseException]) -> None:
    """In this process, raise a received error of type ``name`` as ``cls``: the worker
    runtime's limit errors are ``BaseException`` there, which user code's ``except Exception``
    does not swallow."""
    _RECEIVED_AS[name] = cls


def answered_errors() -> tuple[type[BaseException], ...]:
    """What a call may raise for its caller to be told (a ``Reject``): any ``Exception``, and
    the errors ``receive_error_as`` made, passing back through the call that received them."""
    return (Exception, *_RECEIVED_AS.values())


def error_to_wire(exc: BaseException, debug: bool) -> tuple[str, str, str | None]:
    """The ``[type, message, traceback]`` triple for ``exc``."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        name = cls.__name__
    elif isinstance(exc, WorkerloaderError) and f"workerloader.{cls.__name__}" in _CROSSABLE:
        name = f"workerloader.{cls.__name__}"
    else:
        name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, RemoteError):
        name, message = exc.remote_type, exc.remote_message
    elif len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]
    else:
        message = str(exc)
    tb = "".join(traceback.format_exception(exc)) if debug else None
    return (name, message, tb)


def error_from_wire(error: tuple[str, str, str | None]) -> BaseException:
    """The local exception for a received ``[type, message, traceback]`` triple."""
    name, message, tb = error
    cls = _RECEIVED_AS.get(name) or _CROSSABLE.get(name)
    if cls is None and "." not in name:
        candidate = getattr(builtins, name, None)
        if isinstance(candidate, type) and issubclass(candidate, Exception):
            cls = candidate
    if cls is not None:
        try:
            exc = cls(message)
        except Exception:  # a builtin with a stricter constructor, e.g. UnicodeDecodeError
            pass
        else:
            if tb:
                exc.add_note(f"remote traceback:\n{tb}")
            return exc
    return RemoteError(name, message, tb)


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(slots=True)
class _Export:
    value: object
    refcount: int


@dataclass(slots=True)
class _Import:
    introductions: int = 0
    live: int = 0


@dataclass(slots=True)
class _Question:
    pulled: bool
    explicit_release: bool  # sent unpulled: we owe a Release even after a later Pull


class _AnswerRef:
    """An argument naming one of the peer's earlier (unpulled) pushes; replaced by its value
    before the call starts."""

    __slots__ = ("answer", "error", "value")

    def __init__(self, answer: _Answer) -> None:
        self.answer = answer
        self.value: object = None  # taken when the answer is known: a release may drop it
        self.error: BaseException | None = None

    def take(self) -> None:
        self.value, self.error = self.answer.value, self.answer.error


@dataclass(slots=True)
class _Answer:
    pulled: bool
    implicit_release: bool  # pulled in its push: gone from the table once answered
    released: bool = False
    done: bool = False
    value: object = None
    error: BaseException | None = None
    waiters: list[_Call] = field(default_factory=list)
    joins: list[_Join] = field(default_factory=list)  # calls whose arguments name this answer


@dataclass(frozen=True, slots=True)
class _Call:
    """A received push with its arguments decoded, waiting for (or given) its target."""

    answer_id: int
    answer: _Answer
    path: list[str | int]
    args: list[object] | None
    kwargs: dict[str, object]


@dataclass(slots=True)
class _Join:
    """A call waiting for the answers its arguments name (and, maybe, its target)."""

    call: _Call
    refs: list[_AnswerRef]
    target: object  # the call's target, unless it is an answer
    base: _Answer | None  # the answer the call targets (pipelining), if it does
    remaining: int
    base_error: BaseException | None = None

    def take_base(self) -> None:
        assert self.base is not None
        self.target, self.base_error = self.base.value, self.base.error


_PENDING_HELLO, _OPEN, _CLOSED = range(3)


class Session:
    """One side of an RPC session (see module docstring).

    Args:
        main: the object offered to the peer as target 0, or None to offer nothing.
        stubs: the driver's stub codec.
        limits: the limits this side enforces and respects.
        debug: send remote tracebacks with errors.
    """

    def __init__(
        self,
        main: object,
        stubs: StubCodec,
        *,
        limits: RpcLimits | None = None,
        debug: bool = False,
    ) -> None:
        self.limits: Final = limits or RpcLimits()
        self.debug: Final = debug
        self.version = _wire.PROTOCOL_VERSION
        self._main = main
        self._stubs = stubs
        self._state = _PENDING_HELLO
        self._send_limit = self.limits.max_frame_bytes  # lowered to the peer's cap by its Hello
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._events: deque[Event] = deque()
        self._exports: dict[int, _Export] = {}
        self._export_ids: dict[int, int] = {}  # id(value) -> export id
        self._next_export = -1
        self._imports: dict[int, _Import] = {}
        self._questions: dict[int, _Question] = {}
        self._next_question = 1
        self._answers: dict[int, _Answer] = {}  # not yet released by the peer
        self._running: dict[int, _Answer] = {}  # handed to the driver, not yet resolved
        self._deferred: deque[tuple[_Call, object]] = deque()  # waiting for max_inflight room
        self._next_answer = 1
        self._encoding_exports: list[int] | None = None
        self._decoding_refs: list[_AnswerRef] | None = None  # answers named in a push's args
        self._encoding_result = False  # see encoding_result
        self._close_error: SessionClosed | None = None
        self._send(Hello(_wire.PROTOCOL_VERSION, self.limits.max_frame_bytes))

    # -- state ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the session has ended; every call then raises ``SessionClosed``."""
        return self._state == _CLOSED

    @property
    def running(self) -> int:
        """Evaluations handed out as ``Evaluate`` events and not yet resolved or rejected."""
        return len(self._running)

    @property
    def wants_input(self) -> bool:
        """False while pushes wait for ``max_inflight`` room: the driver should stop reading."""
        return not self._deferred and self._state != _CLOSED

    @property
    def pending_bytes(self) -> int:
        """Bytes queued by ``data_to_send`` callers have not taken yet."""
        return self._out_bytes

    def table_sizes(self) -> dict[str, int]:
        """Live entries per table; for tests and diagnostics."""
        return {
            "exports": len(self._exports),
            "imports": len(self._imports),
            "questions": len(self._questions),
            "answers": len(self._answers),
        }

    # -- bytes ------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call (possibly empty)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        return data

    def next_event(self) -> Event | None:
        """The next event, or None when there is none for now."""
        return self._events.popleft() if self._events else None

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes from the peer. A protocol violation aborts the session (a ``Closed`` event
        follows and an ``Abort`` frame is queued); it is not raised."""
        if self._state == _CLOSED:
            return
        buf = self._inbuf
        buf += data
        pos = 0
        limit = self.limits.max_frame_bytes
        try:
            while len(buf) - pos >= 4:
                (size,) = _wire.HEADER.unpack_from(buf, pos)
                if size == 0 or size > limit:
                    raise ProtocolError(
                        f"frame of {size} bytes from peer exceeds the limit of {limit}"
                    )
                end = pos + 4 + size
                if len(buf) < end:
                    break
                message = _wire.decode_message(bytes(buf[pos + 4 : end]))
                pos = end
                self._handle(message)
                if self._state == _CLOSED:
                    return
        except ProtocolError as exc:
            self.abort(exc)
        finally:
            if pos:
                del buf[:pos]

    def receive_eof(self) -> None:
        """The peer closed its end."""
        self._close(SessionClosed("the peer closed the connection"))

    # -- sending ----------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        frame = _wire.encode_frame(message)
        self._out.append(frame)
        self._out_bytes += len(frame)

    def _check_open(self) -> None:
        if self._close_error is not None:
            raise SessionClosed(str(self._close_error))

    def _encode(self, value: object, root: str) -> tuple[object, list[int]]:
        """Encode a value; if it cannot be sent, roll back the export counts it took."""
        exports: list[int] = []
        outer = self._encoding_exports  # a promise in ``value`` sends its own push meanwhile
        self._encoding_exports = exports
        try:
            return encode_value(value, root, self._export, self.limits), exports
        except BaseException:
            self._rollback_exports(exports)
            raise
        finally:
            self._encoding_exports = outer

    def _rollback_exports(self, exports: list[int]) -> None:
        for export_id in exports:
            self._drop_export(export_id, 1)

    def _send_checked(self, message: Message, exports: list[int], what: str) -> None:
        """Send ``message`` carrying ``what`` ("the arguments", "the result") unless its
        frame is over the limit."""
        frame = _wire.encode_frame(message)
        if len(frame) - 4 > self._send_limit:
            self._rollback_exports(exports)
            raise FrameTooLarge(
                f"{what} took {len(frame) - 4} bytes encoded, over the {self._send_limit} "
                "bytes one message carries (send less, or in parts)"
            )
        self._out.append(frame)
        self._out_bytes += len(frame)

    def push(
        self,
        target: int,
        path: list[str | int],
        args: tuple[list[object], dict[str, object]] | None,
        *,
        pull: bool,
    ) -> int:
        """Send a push and return its question id.

        ``target`` is 0 (the peer's main), an import id (negative) or one of our unpulled
        question ids (positive: pipelining). ``args`` None makes a property read.

        Raises:
            DataCloneError, FrameTooLarge: nothing was sent.
            SessionClosed: the session has ended.
            ValueError: ``target`` names a question that can no longer be pipelined on.
        """
        self._check_open()
        if target > 0:
            question = self._questions.get(target)
            if question is None or not question.explicit_release:
                raise ValueError(f"question {target} cannot be pipelined on")
        if len(path) > self.limits.max_path_len:
            raise ValueError(f"path of {len(path)} steps exceeds {self.limits.max_path_len}")
        wire_args: object = None
        exports: list[int] = []
        if args is not None:
            if not args[1] and flat_scalars(args[0], self.limits):
                wire_args = [args[0], {}]  # already its own wire form
            else:
                wire_args, exports = self._encode([args[0], args[1]], "arguments")
        question_id = self._next_question
        self._send_checked(
            Push(question_id, target, path, wire_args, pull), exports, "the arguments"
        )
        self._next_question += 1
        self._questions[question_id] = _Question(pulled=pull, explicit_release=not pull)
        return question_id

    def pull(self, question_id: int) -> None:
        """Ask for the result of a question sent unpulled (a ``Returned``/``Raised`` follows)."""
        self._check_open()
        question = self._questions.get(question_id)
        if question is None:
            raise ValueError(f"question {question_id} was released")
        if not question.pulled:
            question.pulled = True
            self._send(Pull(question_id))

    def release_question(self, question_id: int) -> None:
        """Drop a question sent unpulled and never pulled; otherwise a no-op (pulled questions
        are released when their answer arrives)."""
        question = self._questions.get(question_id)
        if question is None or question.pulled or self._state == _CLOSED:
            return
        del self._questions[question_id]
        self._send(Release(question_id, 1))

    def retain_import(self, import_id: int) -> None:
        """One more local stub for ``import_id`` (``dup``)."""
        self._imports[import_id].live += 1

    def release_import(self, import_id: int) -> None:
        """A local stub for ``import_id`` was disposed; release it when it was the last."""
        entry = self._imports.get(import_id)
        if entry is None:
            return
        entry.live -= 1
        if entry.live <= 0:
            del self._imports[import_id]
            if self._state != _CLOSED:
                self._send(Release(import_id, entry.introductions))

    def resolve(self, answer_id: int, value: object) -> None:
        """Report the value of an ``Evaluate`` (ignored if the session closed meanwhile)."""
        answer = self._running.pop(answer_id, None)
        if answer is None:
            return
        if answer.pulled and not answer.released and self._state != _CLOSED:
            try:
                self._send_resolve(answer_id, value)
            except Exception as exc:
                # It cannot cross, is too large, or ran this process out of memory as it was
                # encoded: the caller learns which (an unsent answer would leave it waiting).
                self._fail_answer(answer, answer_id, exc.with_traceback(None))
                self._pump()
                return
        answer.done = True
        answer.value = value  # kept until the joins and waiters below have it
        for call in answer.waiters:
            self._start(call, value, None)
        answer.waiters.clear()
        self._answer_done(answer)
        if answer.released:
            answer.value = None
        self._after_answer(answer, answer_id)
        self._pump()

    def reject(self, answer_id: int, error: BaseException) -> None:
        """Report the failure of an ``Evaluate`` (ignored if the session closed meanwhile)."""
        answer = self._running.pop(answer_id, None)
        if answer is not None:
            self._fail_answer(answer, answer_id, error)
            self._pump()

    def abort(self, error: BaseException) -> None:
        """End the session, telling the peer why."""
        if self._state == _CLOSED:
            return
        self._send(Abort(error_to_wire(error, self.debug)))
        self._close(SessionClosed(f"session aborted: {error}"))

    def close(self) -> None:
        """End the session locally without telling the peer (the driver closes the stream)."""
        self._close(SessionClosed("the session was closed"))

    # -- internals: answers -----------------------------------------------------------------

    @property
    def encoding_result(self) -> bool:
        """Whether a value being encoded is a result: it may not name an answer (a promise),
        which the peer takes only in a push's arguments."""
        return self._encoding_result

    def _send_resolve(self, answer_id: int, value: object) -> None:
        self._encoding_result = True
        try:
            wire_value, exports = self._encode(value, "result")
        finally:
            self._encoding_result = False
        self._send_checked(Resolve(answer_id, wire_value), exports, "the result")

    def _after_answer(self, answer: _Answer, answer_id: int) -> None:
        """An answer pulled in its push leaves the table once answered (implicit release)."""
        if answer.implicit_release and not answer.released:
            answer.released = True
            answer.value = None
            self._answers.pop(answer_id, None)

    def _fail_answer(self, answer: _Answer, answer_id: int, error: BaseException) -> None:
        answer.done = True
        answer.error = error
        if answer.pulled and not answer.released and self._state != _CLOSED:
            self._send(Reject(answer_id, error_to_wire(error, self.debug)))
        self._after_answer(answer, answer_id)
        for call in answer.waiters:
            self._start(call, None, error)
        answer.waiters.clear()
        self._answer_done(answer)

    def _start(self, call: _Call, target: object, error: BaseException | None) -> None:
        """Hand a call whose target is known to the driver (or defer it), or fail it."""
        self._running[call.answer_id] = call.answer
        if error is not None:
            self.reject(call.answer_id, error)
        elif len(self._running) > self.limits.max_inflight:
            del self._running[call.answer_id]
            self._deferred.append((call, target))
        else:
            self._events.append(Evaluate(call.answer_id, target, call.path, call.args, call.kwargs))

    def _pump(self) -> None:
        """Start deferred calls while there is room under ``max_inflight``."""
        while self._deferred and len(self._running) < self.limits.max_inflight:
            call, target = self._deferred.popleft()
            self._start(call, target, None)

    # -- internals: capabilities ------------------------------------------------------------

    def _export(self, value: object) -> dict[int, int] | None:
        import_id = self._stubs.unwrap_import(self, value)
        if import_id is not None:
            return {T_IMPORT: import_id}
        question_id = self._stubs.answer_ref(self, value)
        if question_id is not None:
            return {T_ANSWER: question_id}
        if not self._stubs.is_capability(value):
            return None
        key = id(value)
        export_id = self._export_ids.get(key)
        if export_id is not None:
            self._exports[export_id].refcount += 1
        else:
            if len(self._exports) >= self.limits.max_exports:
                raise DataCloneError(
                    f"more than {self.limits.max_exports} capabilities exported at once"
                )
            export_id = self._next_export
            self._next_export -= 1
            self._exports[export_id] = _Export(value, 1)
            self._export_ids[key] = export_id
        assert self._encoding_exports is not None
        self._encoding_exports.append(export_id)
        return {T_EXPORT: export_id}

    def _drop_export(self, export_id: int, count: int) -> None:
        entry = self._exports.get(export_id)
        if entry is None or not 1 <= count <= entry.refcount:
            raise ProtocolError(f"invalid release of capability {export_id}")
        entry.refcount -= count
        if entry.refcount == 0:
            del self._exports[export_id]
            del self._export_ids[id(entry.value)]

    def _import(self, tag: int, cap_id: int) -> object:
        if tag == T_ANSWER:
            answer = self._answers.get(cap_id)
            if answer is None or answer.implicit_release or self._decoding_refs is None:
                raise ProtocolError(f"invalid value from peer: unknown answer {cap_id}")
            ref = _AnswerRef(answer)
            self._decoding_refs.append(ref)
            return ref
        if tag == T_IMPORT:
            entry = self._exports.get(cap_id)
            if entry is None:
                raise ProtocolError(f"invalid value from peer: unknown capability {cap_id}")
            return entry.value
        if cap_id >= 0:
            raise ProtocolError(f"invalid value from peer: bad export id {cap_id}")
        imp = self._imports.get(cap_id)
        if imp is None:
            if len(self._imports) >= self.limits.max_imports:
                raise ProtocolError(
                    f"peer exported more than {self.limits.max_imports} capabilities"
                )
            imp = self._imports[cap_id] = _Import()
        imp.introductions += 1
        imp.live += 1
        return self._stubs.wrap_import(self, cap_id)

    # -- internals: receiving ---------------------------------------------------------------

    def _handle(self, message: Message) -> None:
        if self._state == _PENDING_HELLO:
            if not isinstance(message, Hello):
                raise ProtocolError("peer did not start with Hello")
            if message.version < _wire.MIN_PROTOCOL_VERSION:
                raise ProtocolError(f"unsupported protocol version {message.version}")
            self.version = min(message.version, _wire.PROTOCOL_VERSION)
            self._send_limit = max(1, min(self._send_limit, message.max_frame_bytes))
            self._state = _OPEN
            return
        match message:
            case Push():
                self._on_push(message)
            case Pull(id=answer_id):
                self._on_pull(answer_id)
            case Resolve(id=question_id, value=raw):
                self._take_question(question_id)
                value = decode_value(raw, self._import, self.limits)
                self._events.append(Returned(question_id, value))
            case Reject(id=question_id, error=error):
                self._take_question(question_id)
                self._events.append(Raised(question_id, error_from_wire(error)))
            case Release(id=cap_id, refcount=count):
                self._on_release(cap_id, count)
            case Abort(error=error):
                name, text, _ = error
                self._close(SessionClosed(f"the peer aborted the session: {name}: {text}"))
            case Hello():
                raise ProtocolError("peer sent Hello twice")

    def _take_question(self, question_id: int) -> None:
        question = self._questions.pop(question_id, None)
        if question is None or not question.pulled:
            raise ProtocolError(f"answer for unknown question {question_id}")
        if question.explicit_release:
            self._send(Release(question_id, 1))

    def _on_push(self, push: Push) -> None:
        if push.id != self._next_answer:
            raise ProtocolError(f"push id {push.id} out of sequence (expected {self._next_answer})")
        if len(self._answers) >= self.limits.max_answers:
            raise ProtocolError(f"peer left more than {self.limits.max_answers} answers unreleased")
        if len(push.path) > self.limits.max_path_len:
            raise ProtocolError(f"push path longer than {self.limits.max_path_len} steps")
        args: list[object] | None = None
        kwargs: dict[str, object] = {}
        refs: list[_AnswerRef] = []
        raw = push.args
        if (
            type(raw) is list
            and len(raw) == 2
            and type(raw[0]) is list
            and raw[1] == {}
            and flat_scalars(raw[0], self.limits)
        ):
            args = raw[0]  # plain scalars: nothing to decode
        elif raw is not None:
            self._decoding_refs = refs
            try:
                decoded = decode_value(raw, self._import, self.limits)
            finally:
                self._decoding_refs = None
            if (
                type(decoded) is not list
                or len(decoded) != 2
                or type(decoded[0]) is not list
                or type(decoded[1]) is not dict
                or not all(type(k) is str for k in decoded[1])
            ):
                raise ProtocolError("invalid push from peer: malformed arguments")
            args, kwargs = decoded[0], decoded[1]
        target_id = push.target
        base: _Answer | None = None
        if target_id > 0:
            base = self._answers.get(target_id)
            if base is None or base.implicit_release:
                raise ProtocolError(f"push on unknown or released answer {target_id}")
        elif target_id < 0 and target_id not in self._exports:
            raise ProtocolError(f"push on unknown or released capability {target_id}")
        self._next_answer += 1
        answer = self._answers[push.id] = _Answer(pulled=push.pull, implicit_release=push.pull)
        call = _Call(push.id, answer, push.path, args, kwargs)
        if refs:
            self._join(call, refs, base, target_id)
        elif base is not None:
            if not base.done:
                base.waiters.append(call)
            else:
                self._start(call, base.value, base.error)
        elif target_id < 0:
            self._start(call, self._exports[target_id].value, None)
        elif self._main is None:
            self._start(call, None, LookupError("the peer offers no main capability"))
        else:
            self._start(call, self._main, None)

    def _join(
        self, call: _Call, refs: list[_AnswerRef], base: _Answer | None, target_id: int
    ) -> None:
        """Start ``call`` once every answer its arguments name (and its target) is known."""
        target: object = None
        if base is None:
            if target_id == 0 and self._main is None:
                self._start(call, None, LookupError("the peer offers no main capability"))
                return
            target = self._main if target_id == 0 else self._exports[target_id].value
        pending = {id(r.answer): r.answer for r in refs if not r.answer.done}
        for ref in refs:
            if ref.answer.done:
                ref.take()
        if base is not None and not base.done:
            pending[id(base)] = base
        join = _Join(call, refs, target, base, len(pending))
        if base is not None and base.done:
            join.take_base()
        for answer in pending.values():
            answer.joins.append(join)
        if not pending:
            self._finish_join(join)

    def _answer_done(self, answer: _Answer) -> None:
        """An answer is known: start the calls that were waiting for it in their arguments."""
        for join in answer.joins:
            for ref in join.refs:
                if ref.answer is answer:
                    ref.take()
            if join.base is answer:
                join.take_base()
            join.remaining -= 1
            if join.remaining == 0:
                self._finish_join(join)
        answer.joins.clear()

    def _finish_join(self, join: _Join) -> None:
        failed = [r.error for r in join.refs if r.error is not None]
        if join.base_error is not None:
            failed.append(join.base_error)
        target = join.target
        if failed:
            self._start(join.call, None, failed[0])
            return
        memo: dict[int, object] = {}
        call = join.call
        args = _substitute(call.args, memo)
        kwargs = _substitute(call.kwargs, memo)
        resolved = _Call(call.answer_id, call.answer, call.path, args, kwargs)  # type: ignore[arg-type]
        self._start(resolved, target, None)

    def _on_pull(self, answer_id: int) -> None:
        answer = self._answers.get(answer_id)
        if answer is None or answer.pulled:
            raise ProtocolError(f"invalid pull of answer {answer_id}")
        answer.pulled = True
        if not answer.done:
            return
        if answer.error is not None:
            self._send(Reject(answer_id, error_to_wire(answer.error, self.debug)))
            return
        try:
            self._send_resolve(answer_id, answer.value)
        except Exception as exc:  # as in resolve
            self._send(Reject(answer_id, error_to_wire(exc.with_traceback(None), self.debug)))

    def _on_release(self, cap_id: int, count: int) -> None:
        if cap_id > 0:
            answer = self._answers.pop(cap_id, None)
            if answer is None or count != 1:
                raise ProtocolError(f"invalid release of answer {cap_id}")
            answer.released = True
            answer.value = None
        elif cap_id < 0:
            self._drop_export(cap_id, count)
        else:
            raise ProtocolError("the main capability cannot be released")

    def _close(self, error: SessionClosed) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._close_error = error
        self._exports.clear()
        self._export_ids.clear()
        self._answers.clear()
        self._running.clear()
        self._deferred.clear()
        # Calls read in the same chunk as a violation must not run once the session is over.
        self._events = deque(e for e in self._events if not isinstance(e, Evaluate))
        self._events.append(Closed(error))


def _substitute(value: object, memo: dict[int, object]) -> object:
    """``value`` with every ``_AnswerRef`` replaced by its answer's value (in place for lists
    and dicts, which the decoder made for this call alone)."""
    if isinstance(value, _AnswerRef):
        return value.value
    if isinstance(value, (list, dict, tuple, set, frozenset)):
        key = id(value)
        if key in memo:
            return memo[key]
        memo[key] = value
        if isinstance(value, list):
            for i, item in enumerate(value):
                value[i] = _substitute(item, memo)
        elif isinstance(value, dict):
            for k in list(value):
                value[k] = _substitute(value[k], memo)
        elif isinstance(value, tuple):
            memo[key] = value = tuple(_substitute(item, memo) for item in value)
        # sets hold only hashable values, never an answer reference
    return value
