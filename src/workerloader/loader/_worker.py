"""A running worker: its process and session, the limits its calls run under, and the checked
envelopes it answers with."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import msgspec

from .. import rpc
from .._errors import (
    BindingError,
    CpuLimitExceeded,
    DataCloneError,
    LimitExceeded,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    PermissionDenied,
    SessionClosed,
    SubrequestLimitExceeded,
    WallTimeExceeded,
    WorkerCrashed,
    WorkerError,
    WorkerloaderError,
    WorkerLoadError,
)
from ..bindings._sqlite import call_deadline
from ..rpc._loop import SpinPause, spin_paused
from ..sandbox import WorkerProcess
from ._code import Limits

__all__ = [
    "CPU_SLACK_NS",
    "Budget",
    "Envelope",
    "RunningWorker",
    "WireResponse",
    "as_the_callers",
    "check_shape",
    "in_background",
    "stop_worker",
    "unwrap",
]

_T = TypeVar("_T")

_CPU_POLL_S = 0.005
"""How often the watchdog reads a running call's CPU clock and wall time."""


class Budget:
    """What a call has used of its limits: when it started, and the CPU clock reading its CPU
    is counted from (set at the watchdog's first tick)."""

    __slots__ = ("cpu_base", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.cpu_base: list[int] = []


CPU_SLACK_NS = 10_000_000
"""How far above the host's reading of a worker's CPU clock the worker's own may be taken: a
scheduler tick at 100 Hz, the slowest common one (this machine's is 250 Hz)."""


class RunningWorker:
    """A running worker: its process, its session, and what killed it (if something did)."""

    def __init__(self, process: WorkerProcess, session: rpc.RpcSession, limits: Limits) -> None:
        self.process = process
        self.session = session
        self.limits = limits
        self.killed_by: LimitExceeded | None = None
        self.last_used = time.monotonic()
        self.active_calls = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.open_streams = 0  # streamed response bodies not yet read to their end or released
        self._streams_closed = asyncio.Event()
        self._streams_closed.set()
        self.subrequests = 0  # binding calls since the current call started
        self.deadline: float | None = None  # monotonic end of the current call's wall time
        self.load_report: rpc.RpcPromise | None = None  # until the load is known to have worked
        self.cpu_mark_ns = 0  # the process's CPU time when it was handed out or a call ended
        self.last_budget: Budget | None = None  # the limits' state of the latest call
        self.cpu_seen_ns = 0  # the latest reading of it (the watchdog's, if the process died)
        self._spin_pauses: list[SpinPause] = []  # first calls (or loads) holding the loop's spin
        self.limit_hit: LimitExceeded | None = None  # a limit the host refused a call over
        self.uncached = False  # made by get(None, ...) or load(): no id, no LRU slot
        self.loaded_cpu_ns = 0  # the process's CPU time once load() saw its code loaded
        session.admit = self._admit

    def _admit(self, event: object) -> None:
        """Every call the worker makes to the host (a binding call) counts toward
        ``Limits.subrequests`` of the call in flight, and ends the spin pauses of first
        calls."""
        self.subrequests += 1
        # Binding calls come in streams, the host's answers to which the spin speeds up
        # (kv.get from a worker: ~50-80 µs with it, ~150 µs without).
        while self._spin_pauses:
            self._spin_pauses.pop().end()
        call_deadline.set(self.deadline)  # copied into the task that runs this binding call
        if self.subrequests > self.limits.subrequests:
            # Raised in the worker (where ``except Exception`` does not catch it); the call
            # fails with it whatever the code does then (see WorkerStub._call).
            hit = SubrequestLimitExceeded(
                f"the call made more than {self.limits.subrequests} binding calls "
                "(Limits.subrequests)"
            )
            if self.limit_hit is None:
                self.limit_hit = hit
            raise hit

    def stream_opened(self) -> None:
        """A streamed response body of this worker's is open (``finished`` waits for it)."""
        self.open_streams += 1
        self._streams_closed.clear()

    def stream_closed(self) -> None:
        self.open_streams -= 1
        if not self.open_streams:
            self._streams_closed.set()

    async def finished(self) -> None:
        """Wait until no call is in flight and no streamed body is open: the worker can stop
        without cutting anything off. A stream still open when its fetch's wall time has
        passed is not waited for (its reads fail from then on anyway)."""
        while True:
            await self.idle.wait()  # calls end (or fail) even if the session closes
            budget = self.last_budget
            if not self.open_streams or budget is None:
                return
            loop = asyncio.get_running_loop()
            left = budget.started + self.limits.wall_ms / 1000 - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._streams_closed.wait(), left)

    @property
    def busy(self) -> bool:
        """True while a call is in flight (idle and LRU eviction leave such a worker alone)."""
        return self.active_calls > 0

    async def call(self, method: str, *args: object) -> dict[str, Any]:
        """One envelope-returning call under the worker's cpu and wall limits (the first call
        also waits for, and checks, the load report sent ahead of it)."""
        promise = getattr(self.session.main, method)(*args)
        if self.load_report is None:  # the common case: a warm worker, one plain round trip
            return await self._watched(promise)
        # A first call takes ~1 ms: spinning for its answer would take CPU from the worker and
        # the zygote. Measured, three runs of each: cold POST /execute p50 2.4-2.7 ms and
        # 276-364/s without the spin, 2.9-3.7 ms and 266-318/s with it; warm calls unchanged.
        # Once the worker calls the host, the pause ends (see _admit).
        with self._spin_paused():
            return await self._watched(self._answer(promise.send()))

    async def loaded(self) -> None:
        """Wait until the worker has loaded its code, under its limits; WorkerLoadError if it
        did not."""
        with self._spin_paused():  # as for a first call
            await self._watched(self._check_load())
        self.loaded_cpu_ns = self.process.cpu_ns()  # loading is no work left running

    @contextlib.contextmanager
    def _spin_paused(self) -> Iterator[None]:
        """``spin_paused`` until the block ends or the worker calls the host (``_admit``)."""
        with spin_paused() as pause:
            self._spin_pauses.append(pause)
            try:
                yield
            finally:
                if pause in self._spin_pauses:
                    self._spin_pauses.remove(pause)

    async def _answer(self, promise: rpc.RpcPromise) -> dict[str, Any]:
        await self._check_load()
        envelope: dict[str, Any] = await promise
        return envelope

    async def _check_load(self) -> None:
        report = self.load_report
        if report is None:
            return
        raw = await report  # answered before any call sent after it
        error = None if raw is None else check_shape(raw, _LoadFailure, "load report")
        if error is not None:
            raise WorkerLoadError(
                f"{error.type}: {error.message}", error.file, error.line, error.type
            )
        self.load_report = None

    async def _watched(self, work: Awaitable[_T], budget: Budget | None = None) -> _T:
        """Run ``work`` (waiting on the worker) under the cpu and wall limits.

        A watchdog wakes every 5 ms while the call runs: calls shorter than that cost no
        CPU clock reads. CPU is counted from the first tick, plus the tick interval itself
        (the most the call can have used before it), so a limit can trip at most 5 ms early.

        ``budget`` continues the limits of an earlier call (a streamed response's reads share
        the one of the fetch that answered it: its wall time, CPU and binding calls); without
        one, the call gets a fresh budget, left in ``last_budget``.
        """
        self.last_used = time.monotonic()
        limits = self.limits
        loop = asyncio.get_running_loop()
        fresh = budget is None
        if budget is None:
            budget = self.last_budget = Budget(loop.time())
        started = budget.started
        cpu_base = budget.cpu_base
        handle: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal handle
            cpu_now = self.cpu_seen_ns = self.process.cpu_ns()
            if not cpu_base:
                cpu_base.append(cpu_now - int(_CPU_POLL_S * 1e9))
            if (cpu_now - cpu_base[0]) / 1e6 > limits.cpu_ms:
                self._kill(CpuLimitExceeded(f"the call used more than {limits.cpu_ms} ms of CPU"))
            elif (loop.time() - started) * 1000 > limits.wall_ms:
                self._kill(WallTimeExceeded(f"the call took longer than {limits.wall_ms} ms"))
            else:
                handle = loop.call_later(_CPU_POLL_S, tick)

        handle = loop.call_later(_CPU_POLL_S, tick)
        if fresh and not self.active_calls:
            self.subrequests = 0
            self.limit_hit = None
        self.deadline = time.monotonic() + limits.wall_ms / 1000 - (loop.time() - started)
        self.active_calls += 1
        self.idle.clear()
        try:
            return await work
        except SessionClosed:
            if self.killed_by is None:
                await self.process.wait_exit(0.5)
                if self.process.oom_killed():
                    self.killed_by = MemoryLimitExceeded(
                        f"the worker used more than its {limits.memory_mb} MB of memory"
                    )
            ended: Exception = self.killed_by or WorkerCrashed(
                "the worker process died during the call"
            )
            # What the call wrote before it ended, from the worker's shared output file.
            ended.logs = self.process.output_lines()  # type: ignore[attr-defined]
            raise ended from None
        finally:
            self.active_calls -= 1
            if not self.active_calls:
                self.idle.set()
            self.last_used = time.monotonic()
            if handle is not None:
                handle.cancel()

    def count_cpu(self, reported: object) -> int:
        """The CPU time (ns) of a call that has just ended: what the process used since the
        previous call ended (or since it was handed out, for a first call, which includes
        loading its code). Calls in flight at once each count all of it.

        ``reported`` is the process's own CPU clock as the worker read it when it answered
        (None if it did not answer). The host's reading of that clock lags a worker that still
        runs by up to a scheduler tick (see ``WorkerProcess.cpu_ns``), so the worker's figure
        is taken, held between the host's reading and a tick above it: a worker that lies
        moves at most ``CPU_SLACK_NS`` of CPU per call from one call to the next. A process
        gone meanwhile counts up to the watchdog's last reading."""
        host = max(self.process.cpu_ns(), self.cpu_seen_ns, self.cpu_mark_ns)
        now = host
        if isinstance(reported, int) and not isinstance(reported, bool):
            now = min(max(host, reported), host + CPU_SLACK_NS)
        used = now - self.cpu_mark_ns
        self.cpu_mark_ns = self.cpu_seen_ns = now
        return used

    def raise_limit_hit(self, logs: list[str]) -> None:
        """If the host refused something of the call over a limit (``limit_hit``), fail the
        call with it, with its ``logs``, and stop the worker (calls in flight on it too)."""
        hit = self.limit_hit
        if hit is not None:
            self._kill(hit)
            exc = type(hit)(*hit.args)
            exc.logs = logs  # type: ignore[attr-defined]
            raise exc

    def _kill(self, reason: LimitExceeded) -> None:
        if self.killed_by is None:
            self.killed_by = reason
        self.process.kill()

    async def aclose(self) -> None:
        await stop_worker(self.process, self.session)


def in_background(work: Awaitable[None], tasks: set[asyncio.Task[None]]) -> None:
    """Run ``work`` as a task kept in ``tasks`` until it is done."""
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def stop_worker(process: WorkerProcess, session: rpc.RpcSession) -> None:
    """Stop a worker: the process first, then its session. Closed first, the session would
    wake a live worker with an end of file, costing the host that wake-up (~0.1 ms of its CPU
    on this kind of virtual machine) and the worker its interpreter's orderly shutdown, only
    for the kill to follow."""
    await process.stop()
    await session.aclose()
    await process.aclose()


class _WireError(msgspec.Struct, frozen=True):
    type: str
    message: str
    traceback: str = ""
    module: str = ""  # the exception class's module


class Envelope(msgspec.Struct, frozen=True):
    """What every call returns from a worker; checked, since a worker may be hostile."""

    value: Any = None
    error: _WireError | None = None
    logs: list[str] = msgspec.field(default_factory=list)
    cpu_ns: int = 0  # the worker's CPU clock as it answered (see RunningWorker.count_cpu)


class _LoadFailure(msgspec.Struct, frozen=True):
    type: str
    message: str
    file: str | None = None
    line: int | None = None


class WireResponse(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]
    body: bytes
    stream: Any = None  # a streamed body: the worker's stream, read by ``read()``


def check_shape(raw: object, shape: type[_T], what: str) -> _T:
    """``raw`` converted to ``shape``, or WorkerCrashed if the worker answered nonsense."""
    try:
        return msgspec.convert(raw, shape)
    except msgspec.ValidationError as exc:
        raise WorkerCrashed(f"the worker sent a malformed {what}: {exc}") from None


_RUNTIME = "workerloader.runtime._main"  # where the worker's own limit errors are defined
_BINDING_ERRORS: dict[str, type[WorkerloaderError]] = {
    "PermissionDenied": PermissionDenied,
    "BindingError": BindingError,
}
"""Errors the host's bindings raise into a worker, by name: one the worker's code does not
catch reaches the caller as itself (``except PermissionDenied`` works across the worker)."""


def unwrap(envelope: Envelope) -> Any:
    """The value of a call envelope, or its error raised as the caller should see it."""
    error = envelope.error
    if error is None:
        return envelope.value
    name, message, module = error.type, error.message, error.module
    exc: BaseException
    if name == "MemoryError" and module == "builtins":
        exc = MemoryLimitExceeded(message or "the worker ran out of memory")
    elif name == "OutputLimitExceeded" and module == _RUNTIME:
        exc = OutputLimitExceeded(message)
    elif name in _BINDING_ERRORS and module == _BINDING_ERRORS[name].__module__:
        exc = _BINDING_ERRORS[name](message)  # a binding's refusal the code let through
        exc.add_note(error.traceback)
    else:
        cls = getattr(builtins, name, None) if module == "builtins" else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                exc = cls(message)
                exc.add_note(error.traceback)
            except Exception:
                exc = WorkerError(name, message, error.traceback)
        else:
            exc = WorkerError(name, message, error.traceback)
    exc.logs = envelope.logs  # type: ignore[attr-defined]
    raise exc


_ENVELOPE_PATH = "result['value']"


def as_the_callers(exc: DataCloneError) -> DataCloneError:
    """A worker's answer that could not be sent names its value as the caller sees it: the
    worker wraps each result in an envelope (``{"value": ...}``), the caller gets ``result``."""
    message = str(exc)
    if message.startswith(_ENVELOPE_PATH):
        return DataCloneError("result" + message[len(_ENVELOPE_PATH) :])
    return exc
