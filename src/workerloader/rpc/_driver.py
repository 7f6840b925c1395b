"""The asyncio driver: runs a sans-IO ``Session`` over a byte stream.

The stream is any asyncio transport: a Unix socket (``connect``) or an in-memory pair
(``memory_pair``). Writes are coalesced: everything queued during one turn of the event loop goes
out in one ``write``. Flow control works both ways: senders wait while the transport's buffer is
above ``RpcLimits.write_high_water``, and reading pauses while ``max_inflight`` of the peer's
calls are running here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dis
import functools
import inspect
import socket
import types
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Final, cast

from .._errors import DataCloneError, SessionClosed
from ._core import Closed, Evaluate, Raised, Returned, Session, answered_errors
from ._dispatch import evaluate
from ._limits import RpcLimits
from ._stubs import RpcPromise, RpcStub
from ._target import is_local_capability

__all__ = ["RpcSession", "connect", "memory_pair"]

_STUB_TYPES = (RpcStub, RpcPromise)
_READ_SIZE = 4 * 1024
_READ_SIZE_MAX = 64 * 1024
# A session starts with a small read buffer and grows it when reads fill it: a worker's session
# mostly carries small frames, and a bytearray is zero-filled when made (64 KiB = 16 pages
# written, and so copied, in each forked worker).
# Coalesced output is written once this much is queued, even mid-turn, so the peer can start on
# a long pipelined burst while this side is still producing it.
_EAGER_WRITE_BYTES = 4096


class _Stubs:
    """The ``StubCodec`` the core uses to make and recognise this driver's stubs."""

    def __init__(self, rpc: RpcSession) -> None:
        self._rpc = rpc

    def wrap_import(self, session: Session, import_id: int) -> object:
        return RpcStub(self._rpc, import_id)

    def unwrap_import(self, session: Session, value: object) -> int | None:
        if type(value) is RpcStub and value._rpc is self._rpc:
            return value._target() if value._import_id != 0 else None
        return None

    def is_capability(self, value: object) -> bool:
        # A stub of another session (or of this session's main) is forwarded as our own export.
        return is_local_capability(value) or isinstance(value, _STUB_TYPES)

    def answer_ref(self, session: Session, value: object) -> int | None:
        if type(value) is not RpcPromise or value._rpc is not self._rpc:
            return None
        if session.encoding_result:  # the peer would end the session for it
            raise DataCloneError(
                "a promise (a stub's call or property, not awaited) cannot be returned: "
                "await it and return its value"
            )
        if value._future is not None:
            raise DataCloneError(
                "an awaited promise cannot be passed on; pass its value, or pass the promise "
                "without awaiting it"
            )
        return value._send(pull=False)


class RpcSession(asyncio.BufferedProtocol):
    """One side of an RPC session over an asyncio transport.

    ``main`` is the peer's main capability. Close with ``aclose()`` or ``async with``; closing
    twice is safe, and calls after closing raise ``SessionClosed``. Evaluations of the peer's
    calls run as tasks owned by the session and are cancelled when it closes.
    """

    def __init__(
        self,
        local_main: object = None,
        *,
        limits: RpcLimits | None = None,
        debug: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = Session(local_main, _Stubs(self), limits=limits, debug=debug)
        self.main: RpcStub = RpcStub(self, 0)
        self._transport: asyncio.Transport | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._release_queue: list[tuple[bool, int]] = []
        self._write_resumed: asyncio.Event | None = None
        self._read_paused = False
        self._read_view = memoryview(bytearray(_READ_SIZE))
        self.admit: Callable[[Evaluate], None] | None = None
        """Called before each of the peer's calls runs; raising refuses the call (the
        exception is the caller's answer). The Loader counts binding calls with it."""
        self._closed = self._loop.create_future()

    # -- public -----------------------------------------------------------------------------

    @property
    def awaiting_answers(self) -> int:
        """How many of this side's pulled calls still wait for the peer's answer."""
        return len(self._futures)

    @property
    def closed(self) -> bool:
        """True once the session has ended."""
        return self._closed.done()

    def table_sizes(self) -> dict[str, int]:
        """Live entries in the core's tables (exports, imports, questions, answers)."""
        self._drain_releases()
        return self._session.table_sizes()

    async def wait_closed(self) -> SessionClosed:
        """Wait until the session ends and return why."""
        return await asyncio.shield(self._closed)

    async def aclose(self) -> None:
        """End the session and close the transport; pending calls fail with ``SessionClosed``."""
        if not self.closed:
            self._session.close()
            self._process_events()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> RpcSession:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        limits = self._session.limits
        self._transport.set_write_buffer_limits(high=limits.write_high_water)
        # The Hello waits for this side's first message (still the first frame): a session
        # opened ahead of use, as the Loader opens its ready workers', then wakes neither
        # peer just to say hello.

    def get_buffer(self, sizehint: int) -> memoryview:
        # A reused buffer: plain data_received would make asyncio allocate (and, at its 256 KiB
        # read size, mmap and munmap) a fresh bytes object for every read.
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])
        if nbytes == len(self._read_view) < _READ_SIZE_MAX:
            self._read_view = memoryview(bytearray(len(self._read_view) * 4))

    def data_received(self, data: bytes | memoryview) -> None:
        self._session.receive_data(data)
        self._process_events()
        self._flush()

    def eof_received(self) -> bool:
        self._session.receive_eof()
        self._process_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._session.receive_eof()
        self._process_events()

    def pause_writing(self) -> None:
        pass  # senders check _may_send themselves, which also counts unflushed bytes

    def resume_writing(self) -> None:
        if self._write_resumed is not None:
            self._write_resumed.set()
            self._write_resumed = None

    # -- used by stubs ----------------------------------------------------------------------

    def _may_send(self) -> bool:
        """True while less than ``write_high_water`` is queued (in the core and the transport)."""
        transport = self._transport
        buffered = self._session.pending_bytes
        if transport is not None:
            buffered += transport.get_write_buffer_size()
        return buffered < self._session.limits.write_high_water or self.closed

    async def _writable(self) -> None:
        """Wait until ``_may_send``; the peer must read for that to happen."""
        while not self._may_send():
            self._flush()
            if self._may_send():
                return
            if self._write_resumed is None:
                self._write_resumed = asyncio.Event()
            waiter = asyncio.ensure_future(self._write_resumed.wait())
            try:
                await asyncio.wait([waiter, self._closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def _expect(self, question_id: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._futures[question_id] = future
        self._request_flush()
        return future

    def _release_later(self, import_id: int) -> None:
        self._release_queue.append((True, import_id))
        self._request_flush_threadsafe()

    def _release_question_later(self, question_id: int) -> None:
        self._release_queue.append((False, question_id))
        self._request_flush_threadsafe()

    # -- internals --------------------------------------------------------------------------

    def _request_flush(self) -> None:
        """Write now if nothing was written this loop turn, else once at the end of the turn.

        The first send of a turn goes out at once (lowest latency for a lone call); sends that
        follow in the same turn are coalesced into one write (throughput for many calls).
        """
        if self._flush_scheduled:
            if self._session.pending_bytes >= _EAGER_WRITE_BYTES:
                self._write_pending()
            return
        self._flush()
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _request_flush_threadsafe(self) -> None:
        # Called from __del__, which may run anywhere (another thread, interpreter exit).
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        with contextlib.suppress(RuntimeError):  # loop closed: the session is gone anyway
            self._loop.call_soon_threadsafe(self._flush)

    def _drain_releases(self) -> None:
        queue = self._release_queue
        while queue:
            is_import, ident = queue.pop()
            if is_import:
                self._session.release_import(ident)
            else:
                self._session.release_question(ident)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._drain_releases()
        self._write_pending()
        transport = self._transport
        if self._session.closed and transport is not None and not transport.is_closing():
            transport.close()

    def _write_pending(self) -> None:
        data = self._session.data_to_send()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _process_events(self) -> None:
        session = self._session
        while (event := session.next_event()) is not None:
            match event:
                case Evaluate():
                    self._evaluate(event)
                    if session.pending_bytes >= _EAGER_WRITE_BYTES:
                        self._write_pending()
                case Returned(question_id=question_id, value=value):
                    future = self._futures.pop(question_id, None)
                    if future is not None and not future.done():
                        future.set_result(value)
                case Raised(question_id=question_id, error=error):
                    future = self._futures.pop(question_id, None)
                    if future is not None and not future.done():
                        future.set_exception(error)
                case Closed(error=error):
                    self._on_closed(error)
        transport = self._transport
        if transport is not None:
            wants = session.wants_input
            if wants and self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            elif not wants and not self._read_paused and not session.closed:
                self._read_paused = True
                transport.pause_reading()

    def _evaluate(self, event: Evaluate) -> None:
        answer_id = event.answer_id
        try:
            if self.admit is not None:
                self.admit(event)
            result = evaluate(event.target, event.path, event.args, event.kwargs, _STUB_TYPES)
            if inspect.iscoroutine(result):
                self._start_coroutine(answer_id, result)
                return
            if inspect.isawaitable(result):
                self._spawn(answer_id, result)
                return
        except answered_errors() as exc:
            self._session.reject(answer_id, exc)
            return
        if self._may_send():
            self._session.resolve(answer_id, result)
        else:
            self._spawn(answer_id, _ready(result))

    def _spawn(self, answer_id: int, awaitable: Awaitable[object]) -> None:
        """Finish an evaluation in a task of its own."""
        task = self._loop.create_task(self._finish(answer_id, awaitable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_coroutine(self, answer_id: int, coro: Coroutine[Any, Any, object]) -> None:
        """Run a coroutine's first step now, as the current task, and answer at once if it
        does not suspend (most methods): no extra turn of the loop, yet asyncio.timeout,
        anyio and httpx see a real ``current_task()`` from the first step on.

        The task is created first (its own step is only the continuation), entered for the
        first step, and keeps driving the coroutine if it suspended. The first step runs in
        the task's context, so context variables set there are seen by the later steps.
        """
        loop = self._loop
        code = getattr(coro, "cr_code", None)
        if code is not None and _never_suspends(code):
            # No await in its code: it finishes in this one step, so no task is needed.
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                self._session.resolve(answer_id, stop.value)
            except answered_errors() as exc:
                self._session.reject(answer_id, exc)
            else:  # cannot happen for such code; handled all the same
                self._spawn(answer_id, _resume(coro, yielded))
            return
        if asyncio.current_task(loop) is not None:  # inside a task: 3.11 cannot nest them
            self._spawn(answer_id, coro)
            return
        context = contextvars.copy_context()
        first: list[object] = []  # what the first step yielded, if it suspended
        task = loop.create_task(self._continue(answer_id, coro, first), context=context)
        asyncio.tasks._enter_task(loop, task)
        try:
            first.append(context.run(coro.send, None))
        except StopIteration as stop:
            self._session.resolve(answer_id, stop.value)
            return
        except answered_errors() as exc:
            self._session.reject(answer_id, exc)
            return
        finally:
            asyncio.tasks._leave_task(loop, task)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            suspended = inspect.getcoroutinestate(coro) == inspect.CORO_SUSPENDED
            if task.cancelled() and suspended:  # cancelled before it could resume it
                with contextlib.suppress(BaseException):  # let its finally blocks run
                    coro.throw(asyncio.CancelledError())

        task.add_done_callback(done)

    async def _continue(
        self, answer_id: int, coro: Coroutine[Any, Any, object], first: list[object]
    ) -> None:
        if first:  # the first step suspended: drive the rest here
            await self._finish(answer_id, _resume(coro, first[0]))

    async def _finish(self, answer_id: int, awaitable: Awaitable[object]) -> None:
        try:
            value = await awaitable
        except asyncio.CancelledError:
            if not self._session.closed:
                self._session.reject(answer_id, RuntimeError("the call was cancelled"))
                self._after_answer()
            raise
        except answered_errors() as exc:
            self._session.reject(answer_id, exc)
        else:
            await self._writable()
            self._session.resolve(answer_id, value)
        self._after_answer()

    def _after_answer(self) -> None:
        self._process_events()  # resolving may have started pipelined or deferred calls
        self._request_flush()

    def _on_closed(self, error: SessionClosed) -> None:
        if not self._closed.done():
            self._closed.set_result(error)
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(SessionClosed(str(error)))
        for task in self._tasks:
            task.cancel()
        self._request_flush()  # sends a queued Abort, then closes the transport


async def _ready(value: object) -> object:
    return value


_SUSPENDING_OPS: Final = frozenset(
    {"YIELD_VALUE", "SEND", "GET_AWAITABLE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT"}
)


@functools.lru_cache(maxsize=4096)
def _never_suspends(code: types.CodeType) -> bool:
    """True if a coroutine with this code has no suspension point (no await, async with or
    async for): its first step is its whole run."""
    return not any(i.opname in _SUSPENDING_OPS for i in dis.get_instructions(code))


async def _resume(coro: Coroutine[Any, Any, object], yielded: object) -> object:
    """Drive the rest of a coroutine whose first step already ran (see ``_start_coroutine``).

    ``yielded`` is what that step yielded: a future to wait for, or None for a bare yield. The
    coroutine takes the future's result itself when resumed, as under a Task.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                future = cast("asyncio.Future[object]", yielded)
                future._asyncio_future_blocking = False
                await asyncio.wait([future])
        except asyncio.CancelledError as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


async def connect(
    sock: socket.socket,
    local_main: object = None,
    *,
    limits: RpcLimits | None = None,
    debug: bool = False,
) -> RpcSession:
    """Run a session over a connected stream socket (a Unix socketpair end)."""
    loop = asyncio.get_running_loop()
    _, rpc = await loop.create_unix_connection(
        lambda: RpcSession(local_main, limits=limits, debug=debug), sock=sock
    )
    return rpc


class _MemoryTransport(asyncio.Transport):
    """One end of an in-process byte pipe; delivers writes to the peer on the next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: RpcSession) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self.peer: _MemoryTransport | None = None
        self._closing = False
        self._reading = True
        self._pending: list[bytes] = []
        self._buffered = 0
        self._high = 64 * 1024
        self._write_paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        assert self.peer is not None
        self.peer._pending.append(bytes(data))
        self.peer._buffered += len(data)
        self._loop.call_soon(self.peer._deliver)
        if self.peer._buffered > self._high and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()

    def _deliver(self) -> None:
        if not self._reading or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._buffered = 0
        assert self.peer is not None
        if self.peer._write_paused:
            self.peer._write_paused = False
            self.peer._protocol.resume_writing()
        if not self._closing:
            self._protocol.data_received(data)

    def get_write_buffer_size(self) -> int:
        assert self.peer is not None
        return self.peer._buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        self._loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._protocol.connection_lost, None)
        if self.peer is not None and not self.peer._closing:
            self._loop.call_soon(self.peer._deliver)
            self._loop.call_soon(self.peer.close)


async def memory_pair(
    main_a: object = None,
    main_b: object = None,
    *,
    limits: RpcLimits | None = None,
    debug: bool = False,
) -> tuple[RpcSession, RpcSession]:
    """Two sessions connected in memory: ``a.main`` is ``main_b`` and ``b.main`` is ``main_a``."""
    loop = asyncio.get_running_loop()
    a = RpcSession(main_a, limits=limits, debug=debug)
    b = RpcSession(main_b, limits=limits, debug=debug)
    ta, tb = _MemoryTransport(loop, a), _MemoryTransport(loop, b)
    ta.peer, tb.peer = tb, ta
    a.connection_made(ta)
    b.connection_made(tb)
    await asyncio.sleep(0)
    return a, b
