"""The Loader: sandboxed workers by id, started lazily, kept warm, evicted by LRU and idle TTL."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import re
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from .. import rpc
from .._errors import (
    CpuLimitExceeded,
    DataCloneError,
    LimitExceeded,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    SessionClosed,
    SubrequestLimitExceeded,
    WallTimeExceeded,
    WorkerCrashed,
    WorkerError,
    WorkerLoadError,
)
from ..bindings import (
    AiBinding,
    AiConfig,
    BlobBucket,
    Documents,
    HttpGateway,
    KvNamespace,
    SqlDatabase,
)
from ..bindings._docs import DocumentStore
from ..bindings._kv import KvStore
from ..bindings._sqlite import call_deadline, open_database
from ..rpc._loop import SpinPause, spin_paused, spin_unless
from ..runtime._main import SESSION_LIMITS
from ..runtime.workers import WorkerEntrypoint
from ..sandbox import Sandbox, WorkerProcess
from ._code import Limits, WorkerCode
from ._exports import Exports
from ._http import Request, Response

__all__ = ["EntrypointStub", "Loader", "WorkerStub"]

_E = TypeVar("_E", bound=type[WorkerEntrypoint])
_CPU_POLL_S = 0.005
_CGROUP_HEADROOM_MB = 64
_SDK_CACHE_SIZE = 1024
"""Binding sets ``Loader.sdk`` keeps (one per distinct scope); all are dropped when full."""
_SDK_STORES = ("db", "kv", "sql", "blobs")

_INSECURE_NOTICE = (
    "[workerloader] insecure mode: this machine has no sandbox and the Loader was started with "
    "insecure=True, so this worker ran unconfined"
)


class _Budget:
    """What a call has used of its limits: when it started, and the CPU clock reading its CPU
    is counted from (set at the watchdog's first tick)."""

    __slots__ = ("cpu_base", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.cpu_base: list[int] = []


_CPU_SLACK_NS = 10_000_000
"""How far above the host's reading of a worker's CPU clock the worker's own may be taken: a
scheduler tick at 100 Hz, the slowest common one (this machine's is 250 Hz)."""
_BETWEEN_CALLS_POLL_S = 0.1
_BETWEEN_CALLS_RECENT_S = 10.0
_BETWEEN_CALLS_ALL_EVERY = 10
"""CPU a worker uses between calls is read every ``_BETWEEN_CALLS_POLL_S`` for
``_BETWEEN_CALLS_RECENT_S`` after its last call, and every ``_BETWEEN_CALLS_ALL_EVERY`` polls
after that (one clock read per worker: ~1 ms per poll with 1,000 live workers)."""


class _Worker:
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
        self.subrequests = 0  # binding calls since the current call started
        self.deadline: float | None = None  # monotonic end of the current call's wall time
        self.load_report: rpc.RpcPromise | None = None  # until the load is known to have worked
        self.cpu_mark_ns = 0  # the process's CPU time when it was handed out or a call ended
        self.last_budget: _Budget | None = None  # the limits' state of the latest call
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
        error = None if raw is None else _check(raw, _LoadFailure, "load report")
        if error is not None:
            raise WorkerLoadError(
                f"{error.type}: {error.message}", error.file, error.line, error.type
            )
        self.load_report = None

    async def _watched(self, work: Awaitable[_T], budget: _Budget | None = None) -> _T:
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
            budget = self.last_budget = _Budget(loop.time())
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
        moves at most ``_CPU_SLACK_NS`` of CPU per call from one call to the next. A process
        gone meanwhile counts up to the watchdog's last reading."""
        host = max(self.process.cpu_ns(), self.cpu_seen_ns, self.cpu_mark_ns)
        now = host
        if isinstance(reported, int) and not isinstance(reported, bool):
            now = min(max(host, reported), host + _CPU_SLACK_NS)
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
        await _stop(self.process, self.session)


def _in_background(work: Awaitable[None], tasks: set[asyncio.Task[None]]) -> None:
    """Run ``work`` as a task kept in ``tasks`` until it is done."""
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _stop(process: WorkerProcess, session: rpc.RpcSession) -> None:
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


class _Envelope(msgspec.Struct, frozen=True):
    """What every call returns from a worker; checked, since a worker may be hostile."""

    value: Any = None
    error: _WireError | None = None
    logs: list[str] = msgspec.field(default_factory=list)
    cpu_ns: int = 0  # the worker's CPU clock as it answered (see _Worker.count_cpu)


class _LoadFailure(msgspec.Struct, frozen=True):
    type: str
    message: str
    file: str | None = None
    line: int | None = None


class _WireResponse(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]
    body: bytes
    stream: Any = None  # a streamed body: the worker's stream, read by ``read()``


_T = TypeVar("_T")


def _check(raw: object, shape: type[_T], what: str) -> _T:
    """``raw`` converted to ``shape``, or WorkerCrashed if the worker answered nonsense."""
    try:
        return msgspec.convert(raw, shape)
    except msgspec.ValidationError as exc:
        raise WorkerCrashed(f"the worker sent a malformed {what}: {exc}") from None


def _unwrap(envelope: _Envelope) -> Any:
    """The value of a call envelope, or its error raised as the caller should see it."""
    error = envelope.error
    if error is None:
        return envelope.value
    name, message = error.type, error.message
    exc: BaseException
    if name == "MemoryError":
        exc = MemoryLimitExceeded(message or "the worker ran out of memory")
    elif name == "OutputLimitExceeded":
        exc = OutputLimitExceeded(message)
    else:
        cls = getattr(builtins, name, None)
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


def _as_the_callers(exc: DataCloneError) -> DataCloneError:
    """A worker's answer that could not be sent names its value as the caller sees it: the
    worker wraps each result in an envelope (``{"value": ...}``), the caller gets ``result``."""
    message = str(exc)
    if message.startswith(_ENVELOPE_PATH):
        return DataCloneError("result" + message[len(_ENVELOPE_PATH) :])
    return exc


class WorkerStub:
    """A handle on a worker by id. Returned at once; the worker starts on the first call."""

    def __init__(self, loader: Loader, worker_id: str | None, factory: Callable[[], WorkerCode]):
        self._loader = loader
        self._id = worker_id
        self._factory = factory
        self._worker: _Worker | None = None
        self._starting: asyncio.Task[_Worker] | None = None
        self.logs: list[str] = []
        """Output of the most recent call through this stub."""
        self._notice: str | None = None  # for the next call's logs
        self.cpu_ms = 0.0
        """CPU time of the most recent call through this stub, in milliseconds, whatever its
        outcome: what the worker's process used since its previous call ended, so a first call
        includes loading the code (see ``_Worker.count_cpu`` for how it is measured)."""

    def get_entrypoint(
        self, name: str | None = None, props: dict[str, object] | None = None
    ) -> EntrypointStub:
        """The default entrypoint (``name=None``) or a named one, with host-bound ``props``."""
        return EntrypointStub(self, name, props)

    async def fetch(self, request: Request | str) -> Response:
        """The same as ``get_entrypoint().fetch(request)``."""
        return await self.get_entrypoint().fetch(request)

    async def _running(self) -> _Worker:
        worker = self._worker
        if worker is not None and not worker.session.closed and worker.killed_by is None:
            return worker
        if worker is not None and worker.killed_by is not None and not worker.busy:
            # Stopped between calls (see Loader._watch_between_calls): the next call says so.
            self._notice = (
                f"[workerloader] a fresh worker: the last one was stopped: {worker.killed_by}"
            )
            self._worker = None
        if self._starting is None or self._starting.done():
            code = self._factory()
            ready = self._loader._take_ready()
            if ready is not None:  # the common case: started at once, no task, no loop turn
                return self._begin(code, *ready)
            self._starting = asyncio.ensure_future(self._start(code))
        try:
            return await asyncio.shield(self._starting)
        finally:
            if self._starting.done() and self._starting.exception() is not None:
                self._starting = None

    async def _start(self, code: WorkerCode) -> _Worker:
        process, session = await self._loader._open_worker()
        return self._begin(code, process, session)

    def _begin(self, code: WorkerCode, process: WorkerProcess, session: rpc.RpcSession) -> _Worker:
        """Make ``process`` this stub's worker and send it ``code`` (checked by the first
        call: the code loads while that call is on its way)."""
        # The load goes out first: the worker's wake-up (up to ~0.3 ms on an idle machine)
        # then overlaps with the host's bookkeeping (paced cold p50 lower by 12-58 µs in three
        # alternating runs, the ready queue's refill deferred likewise).
        # Read first: idle in the pool, it has used only its start's CPU, counted as no call's.
        cpu_at_start = process.cpu_ns()
        try:
            load_report = session.main.load(code.to_wire()).send()
        except BaseException:
            self._loader._stop_soon(_stop(process, session))
            raise
        worker = _Worker(process, session, code.limits)
        worker.cpu_mark_ns = worker.cpu_seen_ns = cpu_at_start
        worker.load_report = load_report
        self._loader._workers.add(worker)
        self._worker = worker
        if self._id is None:
            # No id holds it: it ends with this stub (or its idle TTL, or the loader).
            worker.uncached = True
            weakref.finalize(self, self._loader._drop_soon, worker)
        # The cgroup is a backstop above RLIMIT_AS (room for the interpreter's own pages too),
        # attached by the chores thread. Queued once the first call has gone out too: waking
        # that thread costs this one a wake-up on another CPU, and the worker loads meanwhile.
        limit = (code.limits.memory_mb + _CGROUP_HEADROOM_MB) << 20
        asyncio.get_running_loop().call_soon(self._loader._sandbox.limit_memory, process, limit)
        return worker

    async def _call(self, method: str, *args: object) -> Any:
        self.cpu_ms = 0.0  # if no worker gets the call
        worker = await self._running()
        try:
            raw: Any = None
            try:
                raw = await worker.call(method, *args)
            except DataCloneError as exc:
                raise _as_the_callers(exc) from None
            except MemoryError:  # the worker's process ran out as it encoded its answer
                raise MemoryLimitExceeded(
                    f"the worker ran out of its {worker.limits.memory_mb} MB of memory "
                    "sending its answer"
                ) from None
            finally:
                reported = raw.get("cpu_ns") if isinstance(raw, dict) else None
                self.cpu_ms = worker.count_cpu(reported) / 1e6
            envelope = _check(raw, _Envelope, "answer")
            if self._notice is not None:
                envelope.logs.insert(0, self._notice)
                self._notice = None
            if self._loader._sandbox.insecure:
                envelope.logs.insert(0, _INSECURE_NOTICE)
            self.logs = envelope.logs
            worker.raise_limit_hit(envelope.logs)
            return _unwrap(envelope)
        except (LimitExceeded, WorkerCrashed, WorkerLoadError) as exc:
            self.logs = getattr(exc, "logs", [])
            # Whatever ended the call, the worker does not serve another: the next call starts
            # a fresh one (a worker that ran out of memory may hold half-built state, and one
            # whose code failed to load gets the factory's code again).
            if self._worker is worker:
                self._worker = None
                self._starting = None  # its result is this worker
            await self._loader._forget(worker)
            raise

    async def aclose(self) -> None:
        """Stop the worker now, even in the middle of a call (the next call starts a fresh
        one)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            await self._loader._forget(worker)

    async def _close_when_idle(self) -> None:
        """Stop the worker once its calls in flight have finished (LRU and idle eviction)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        await worker.idle.wait()  # calls end (or fail) even if the session closes
        await self._loader._forget(worker)


class EntrypointStub(rpc.RpcForwarder):
    """An entrypoint of a worker: ``await ep.fetch(request)`` and ``await ep.method(*args)``.

    Put one in another worker's ``env`` and that worker can call it (worker-to-worker): the
    calls are forwarded, and the target worker answers only its entrypoint's public methods.
    """

    def __init__(self, stub: WorkerStub, name: str | None, props: dict[str, object] | None):
        self._stub = stub
        self._name = name
        self._props = props

    async def fetch(self, request: Request | str) -> Response:
        """The entrypoint's ``fetch`` for a request or a URL."""
        req = Request(request) if isinstance(request, str) else request
        value = await self._stub._call("fetch", self._name, req.to_wire(), self._props)
        if not isinstance(value, dict) or "__response__" not in value:
            raise TypeError(f"fetch() must return a workers.Response, not {type(value).__name__}")
        wire = _check(value["__response__"], _WireResponse, "response")
        if wire.stream is None:
            plain = Response(wire.status, wire.headers, wire.body)
            plain.cpu_ms = self._stub.cpu_ms
            return plain
        stream = wire.stream
        if not isinstance(stream, rpc.RpcStub):
            raise WorkerCrashed("the worker sent a malformed response: its stream is not one")
        # The worker that answered, and the fetch's budget (no await since): the reads run the
        # worker's code (its generator) under what is left of the fetch's limits.
        worker = self._stub._worker
        budget = worker.last_budget if worker is not None else None

        async def read() -> bytes:
            work = stream.read()
            if worker is None:
                chunk = await work
            else:
                try:
                    chunk = await worker._watched(work, budget)
                finally:
                    worker.raise_limit_hit([])
            if not isinstance(chunk, bytes):
                raise WorkerCrashed("the worker sent a malformed response: a chunk not bytes")
            return chunk

        def release() -> None:
            stream.dispose()
            if worker is not None:  # the stream's CPU is this response's, not the next call's
                response.cpu_ms += worker.count_cpu(None) / 1e6

        response = Response(wire.status, wire.headers, b"", read, release)
        response.cpu_ms = self._stub.cpu_ms
        # While its stream can be read, the stub (so an uncached worker) lives on.
        response._stub = self._stub  # type: ignore[attr-defined]
        return response

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(f"{method} (names starting with '_' are never a worker's methods)")

        async def call(*args: object, **kwargs: object) -> Any:
            return await self._stub._call(
                "invoke", self._name, method, list(args), kwargs, self._props
            )

        return call


_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _namespace(name: str) -> str:
    if not isinstance(name, str) or not _NAMESPACE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid namespace or name {name!r} (letters, digits, _ . -)")
    return name


def _grants(read: bool, write: bool) -> frozenset[str]:
    return frozenset({"read"} if read else set()) | frozenset({"write"} if write else set())


class _Stores:
    """The SQLite databases behind KV and documents, opened on first use."""

    def __init__(self, data_dir: Path) -> None:
        self.kv = KvStore(open_database(data_dir / "kv.sqlite3"))
        self.docs = DocumentStore(open_database(data_dir / "documents.sqlite3"))


class Loader:
    """Loads worker code into sandboxed workers on demand (see ``docs/design.md``).

    Use as ``async with Loader() as loader``. ``max_workers`` bounds the warm workers (least
    recently used evicted first); workers idle longer than ``idle_ttl_s`` are stopped.

    Where namespaces, seccomp or Landlock are missing (or not root), entering refuses with
    ``SandboxUnavailable`` unless ``insecure=True``; then workers run unconfined and every
    call's logs say so.
    """

    def __init__(
        self,
        data_dir: str | Path = ".workerloader",
        *,
        max_workers: int = 1000,
        idle_ttl_s: float = 300.0,
        pool_size: int = 8,
        insecure: bool = False,
        ai: AiConfig | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.ai_config = ai
        self.max_workers = max_workers
        self.idle_ttl_s = idle_ttl_s
        self._sandbox = Sandbox(pool_size=pool_size, insecure=insecure)
        # Workers taken from the zygote ahead of need, their sessions already open: a cold
        # start then costs no zygote round trip and no session setup (each a process wake-up,
        # up to a millisecond or more on an idle virtual machine).
        self._ready: deque[tuple[WorkerProcess, rpc.RpcSession]] = deque()
        self._ready_target = min(4, pool_size)
        self._refilling: asyncio.Task[None] | None = None
        self._closing = False
        self._stubs: OrderedDict[str, WorkerStub] = OrderedDict()
        self._reaper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._evicting: set[asyncio.Task[None]] = set()  # LRU evictions waiting for calls
        self._stopping: set[asyncio.Task[None]] = set()  # workers being stopped
        self._forgetting = 0  # workers being stopped by _forget
        self._unspin: Callable[[], None] = lambda: None
        self._workers: set[_Worker] = set()  # every running worker, cached or not
        self._stores_cache: _Stores | None = None
        self.exports = Exports()
        """Bindings for the host entrypoints registered with ``export``."""
        self._sql_dbs: dict[Path, SqlDatabase] = {}
        self._sdk_cache: dict[tuple[object, ...], dict[str, object]] = {}

    async def __aenter__(self) -> Loader:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._closing = False
        await self._sandbox.start()
        self._loop = asyncio.get_running_loop()
        self._reaper = asyncio.ensure_future(self._reap_idle())
        self._watcher = asyncio.ensure_future(self._watch_between_calls())
        self._refill_soon()
        # The host's loop spins only while no worker is being started or stopped: that work
        # needs the CPU a spin would take (on a service's warm traffic it is idle, and the spin
        # catches the next request). Measured in the service, alternating a 600 µs spin under
        # this condition with an unconditional 200 µs one (three rounds each): cold POST
        # /execute p50 2.22 against 2.25 ms from one client, 370 against 357/s on four.
        self._unspin = spin_unless(self._busy_in_background)
        return self

    def _busy_in_background(self) -> bool:
        """True while workers are being started (the ready queue refills) or stopped."""
        refilling = self._refilling is not None and not self._refilling.done()
        return refilling or bool(self._stopping) or self._forgetting > 0

    def _take_ready(self) -> tuple[WorkerProcess, rpc.RpcSession] | None:
        """A fresh worker with its session open, from the ready queue (None if it is empty);
        the queue refills in the background (from the next loop turn: the cold start that
        takes this worker sends its code first)."""
        asyncio.get_running_loop().call_soon(self._refill_soon)
        while self._ready:
            process, session = self._ready.popleft()
            if not session.closed:
                return process, session
            self._stop_soon(process.aclose())
        return None

    async def _open_worker(self) -> tuple[WorkerProcess, rpc.RpcSession]:
        """A new worker from the sandbox with its session open; the worker is stopped if that
        fails."""
        process = await self._sandbox.spawn()
        try:
            session = await rpc.connect(process.channel, limits=SESSION_LIMITS)
        except BaseException:
            await process.aclose()
            raise
        return process, session

    def _refill_soon(self) -> None:
        if self._closing:
            return
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.ensure_future(self._refill())

    async def _refill(self) -> None:
        await asyncio.sleep(0.002)  # after the cold start that asked for it has gone out
        while len(self._ready) < self._ready_target:
            try:
                process, session = await self._open_worker()
            except Exception:
                return  # the next cold start opens its own, and reports what is wrong
            self._ready.append((process, session))

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every worker and the sandbox. Safe to call twice."""
        self._closing = True
        self._unspin()
        for task in (self._reaper, self._watcher):
            if task is not None:
                task.cancel()
        self._reaper = self._watcher = None
        if self._refilling is not None:
            self._refilling.cancel()
            with contextlib.suppress(BaseException):
                await self._refilling
            self._refilling = None
        while self._ready:
            await _stop(*self._ready.popleft())
        self._stubs.clear()
        for task in list(self._evicting):
            task.cancel()  # the loop below stops their workers, calls in flight or not
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for worker in list(self._workers):
            await self._forget(worker)
        await self._sandbox.aclose()

    async def _forget(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        self._forgetting += 1
        try:
            await worker.aclose()
        finally:
            self._forgetting -= 1

    def _stop_soon(self, stopping: Awaitable[None]) -> None:
        """Stop a worker in the background; ``aclose`` waits for it."""
        _in_background(stopping, self._stopping)

    def get(self, worker_id: str | None, factory: Callable[[], WorkerCode]) -> WorkerStub:
        """The worker ``worker_id``, started from ``factory()`` on first use if no warm worker
        holds that id (same id ⇒ same code is the caller's contract). ``None`` makes an uncached
        worker. Load errors surface on the first call."""
        if worker_id is None:
            return WorkerStub(self, None, factory)
        stub = self._stubs.get(worker_id)
        if stub is None:
            stub = self._stubs[worker_id] = WorkerStub(self, worker_id, factory)
            while len(self._stubs) > self.max_workers:
                _, oldest = self._stubs.popitem(last=False)
                _in_background(oldest._close_when_idle(), self._evicting)
        self._stubs.move_to_end(worker_id)
        return stub

    async def load(self, code: WorkerCode) -> WorkerStub:
        """An uncached worker, loaded now: load errors raise here."""
        stub = WorkerStub(self, None, lambda: code)
        worker = await stub._running()
        try:
            await worker.loaded()
        except BaseException:
            await stub.aclose()
            raise
        return stub

    async def evict(self, worker_id: str) -> None:
        """Stop the warm worker ``worker_id`` now, if any (a call in flight fails with
        ``WorkerCrashed``)."""
        stub = self._stubs.pop(worker_id, None)
        if stub is not None:
            await stub.aclose()

    # -- bindings ---------------------------------------------------------------------------

    def kv(self, namespace: str, *, read: bool = True, write: bool = True) -> KvNamespace:
        """The KV namespace ``namespace``, durable under the data dir."""
        return KvNamespace(self._stores().kv, _namespace(namespace), _grants(read, write))

    def db(self, namespace: str, *, read: bool = True, write: bool = True) -> Documents:
        """The document collections of ``namespace`` (``sdk.db``)."""
        return Documents(self._stores().docs, _namespace(namespace), _grants(read, write))

    def sql(self, name: str, *, read: bool = True, write: bool = True) -> SqlDatabase:
        """The SQL database ``name`` (one SQLite file per name)."""
        path = self.data_dir / "sql" / f"{_namespace(name)}.sqlite3"
        db = self._sql_dbs.get(path)
        if db is None:
            db = self._sql_dbs[path] = SqlDatabase.open(path, frozenset())
        return db.with_grants(_grants(read, write))

    def blobs(self, bucket: str, *, read: bool = True, write: bool = True) -> BlobBucket:
        """The blob bucket ``bucket`` (files under the data dir, written atomically)."""
        return BlobBucket(self.data_dir / "blobs" / _namespace(bucket), _grants(read, write))

    def export(self, cls: _E) -> _E:
        """Register a host-side ``WorkerEntrypoint`` class (use as a decorator); then
        ``loader.exports.Name(props={...})`` is a binding whose calls run it with those props."""
        return self.exports.register(cls)

    def ai(self) -> AiBinding:
        """The AI binding for the provider in ``Loader(ai=AiConfig(...))`` (its calls raise
        ``BindingError: no AI provider configured`` without one)."""
        return AiBinding(self.ai_config)

    def sdk(
        self,
        namespace: str = "default",
        *,
        user_id: str | None = None,
        authenticated: bool = False,
        permissions: Sequence[str] | Mapping[str, Sequence[str]] = ("read", "write"),
        api: HttpGateway | None = None,
    ) -> dict[str, object]:
        """Everything ``workers.sdk`` offers, for ``env["SDK"]``: db, kv, sql, blobs scoped to
        ``namespace``, ai, api (outbound HTTP through ``api``), and the caller's ``context``
        (data, bound here).

        ``permissions`` is ``("read", "write")``-style for every store, or per store:
        ``{"db": ["read"], "kv": ["read", "write"]}`` (a store not named gets no access).

        The binding objects hold nothing but their scope, so calls with the same namespace,
        grants and ``api`` share them (a service makes one set per caller, not one per
        request); the dict and its ``context`` are new each time.
        """

        def grants(store: str) -> dict[str, bool]:
            given = permissions.get(store, ()) if isinstance(permissions, Mapping) else permissions
            return {"read": "read" in given, "write": "write" in given}

        scope = {store: grants(store) for store in _SDK_STORES}
        # Keyed by what the bindings are made of: the same grants share them however they
        # were spelled. The cached bindings hold ``api``, so its id stays its own meanwhile.
        key = (namespace, tuple(tuple(g.values()) for g in scope.values()), id(api))
        bindings = self._sdk_cache.get(key)
        if bindings is None:
            if len(self._sdk_cache) >= _SDK_CACHE_SIZE:
                self._sdk_cache.clear()
            bindings = self._sdk_cache[key] = self._new_sdk(namespace, scope, api)
        context = {
            "user_id": user_id,
            "namespace": namespace,
            "authenticated": authenticated,
            "permissions": (
                {k: list(v) for k, v in permissions.items()}
                if isinstance(permissions, Mapping)
                else list(permissions)
            ),
        }
        return {**bindings, "context": context}

    def _new_sdk(
        self, namespace: str, scope: dict[str, dict[str, bool]], api: HttpGateway | None
    ) -> dict[str, object]:
        return {
            "db": self.db(namespace, **scope["db"]),
            "kv": self.kv(namespace, **scope["kv"]),
            "sql": self.sql(namespace, **scope["sql"]),
            "blobs": self.blobs(namespace, **scope["blobs"]),
            "ai": self.ai(),
            "api": api,
        }

    def _stores(self) -> _Stores:
        if self._stores_cache is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._stores_cache = _Stores(self.data_dir)
        return self._stores_cache

    def _drop_soon(self, worker: _Worker) -> None:
        """Stop an uncached worker whose stub is gone (the garbage collector calls this, in
        whatever thread collected the stub)."""
        loop = self._loop
        if loop is None or self._closing or worker not in self._workers:
            return  # (stopped already: the common case, the stub's aclose came first)
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(self._drop, worker)

    def _drop(self, worker: _Worker) -> None:
        if worker in self._workers and not self._closing:
            self._stop_soon(self._forget(worker))

    async def _watch_between_calls(self) -> None:
        """Hold work a worker leaves running after its calls (``ctx.wait_until``, a task) to
        its ``cpu_ms`` too: CPU used since its last call ended past that (and the slack of a
        call's CPU figure, for the runtime's own) stops the worker, and the stub's next call
        gets a fresh one, with a log line saying why."""
        polls = 0
        while True:
            await asyncio.sleep(_BETWEEN_CALLS_POLL_S)
            polls += 1
            every = polls % _BETWEEN_CALLS_ALL_EVERY == 0
            recent = time.monotonic() - _BETWEEN_CALLS_RECENT_S
            for worker in list(self._workers):
                if worker.busy or worker.killed_by is not None:
                    continue
                if not every and worker.last_used < recent:
                    continue
                since = max(worker.cpu_mark_ns, worker.loaded_cpu_ns)
                used_ns = worker.process.cpu_ns() - since
                if used_ns > worker.limits.cpu_ms * 1_000_000 + _CPU_SLACK_NS:
                    worker._kill(
                        CpuLimitExceeded(
                            "work left running after a call (ctx.wait_until, a task) used "
                            f"more than {worker.limits.cpu_ms} ms of CPU"
                        )
                    )
                    self._stop_soon(self._forget(worker))

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_ttl_s, 10.0))
            now = time.monotonic()
            for uncached in [w for w in self._workers if w.uncached]:  # in no stub of _stubs
                if not uncached.busy and now - uncached.last_used > self.idle_ttl_s:
                    await self._forget(uncached)
            for worker_id, stub in list(self._stubs.items()):
                worker = stub._worker
                if (
                    worker is not None
                    and not worker.busy
                    and now - worker.last_used > self.idle_ttl_s
                    and self._stubs.get(worker_id) is stub
                ):
                    del self._stubs[worker_id]
                    await stub._close_when_idle()
