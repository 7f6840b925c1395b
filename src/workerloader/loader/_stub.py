"""Stubs on workers: ``WorkerStub`` (a worker by id, started on its first call) and
``EntrypointStub`` (one of its entrypoints: ``fetch`` and RPC methods)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import rpc
from .._errors import (
    DataCloneError,
    LimitExceeded,
    MemoryLimitExceeded,
    WorkerCrashed,
    WorkerLoadError,
)
from .._http_rules import response_problem
from ..sandbox import WorkerProcess
from ._code import WorkerCode
from ._http import Request, Response
from ._worker import (
    Envelope,
    RunningWorker,
    WireResponse,
    as_the_callers,
    check_shape,
    stop_worker,
    unwrap,
)

if TYPE_CHECKING:
    from ._loader import Loader

__all__ = ["EntrypointStub", "WorkerStub"]

_CGROUP_HEADROOM_MB = 64
"""A worker's memory cgroup allows this much above its ``memory_mb``: the interpreter's own
pages (RLIMIT_AS holds the worker to ``memory_mb`` above what it mapped at start)."""

_INSECURE_NOTICE = (
    "[workerloader] insecure mode: this machine has no sandbox and the Loader was started with "
    "insecure=True, so this worker ran unconfined"
)


class WorkerStub:
    """A handle on a worker by id. Returned at once; the worker starts on the first call."""

    def __init__(self, loader: Loader, worker_id: str | None, factory: Callable[[], WorkerCode]):
        self._loader = loader
        self._id = worker_id
        self._factory = factory
        self._worker: RunningWorker | None = None
        self._starting: asyncio.Task[RunningWorker] | None = None
        self.logs: list[str] = []
        """Output of the most recent call through this stub."""
        self._notice: str | None = None  # for the next call's logs
        self.cpu_ms = 0.0
        """CPU time of the most recent call through this stub, in milliseconds, whatever its
        outcome: what the worker's process used since its previous call ended, so a first call
        includes loading the code (see ``RunningWorker.count_cpu`` for how it is measured)."""

    def get_entrypoint(
        self, name: str | None = None, props: dict[str, object] | None = None
    ) -> EntrypointStub:
        """The default entrypoint (``name=None``) or a named one, with host-bound ``props``."""
        return EntrypointStub(self, name, props)

    async def fetch(self, request: Request | str) -> Response:
        """The same as ``get_entrypoint().fetch(request)``."""
        return await self.get_entrypoint().fetch(request)

    async def _running(self) -> RunningWorker:
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

    async def _start(self, code: WorkerCode) -> RunningWorker:
        process, session = await self._loader._open_worker()
        return self._begin(code, process, session)

    def _begin(
        self, code: WorkerCode, process: WorkerProcess, session: rpc.RpcSession
    ) -> RunningWorker:
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
            self._loader._stop_soon(stop_worker(process, session))
            raise
        worker = RunningWorker(process, session, code.limits)
        worker.cpu_mark_ns = worker.cpu_seen_ns = cpu_at_start
        worker.load_report = load_report
        self._loader._workers.add(worker)
        self._worker = worker
        if self._id is None or self._loader._stubs.get(self._id) is not self:
            # No id holds it (an uncached stub, or one evicted while a caller still held it):
            # it ends with this stub, its idle TTL, or the loader.
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
                raise as_the_callers(exc) from None
            except MemoryError:  # the worker's process ran out as it encoded its answer
                raise MemoryLimitExceeded(
                    f"the worker ran out of its {worker.limits.memory_mb} MB of memory "
                    "sending its answer"
                ) from None
            finally:
                reported = raw.get("cpu_ns") if isinstance(raw, dict) else None
                self.cpu_ms = worker.count_cpu(reported) / 1e6
            envelope = check_shape(raw, Envelope, "answer")
            if self._notice is not None:
                envelope.logs.insert(0, self._notice)
                self._notice = None
            if self._loader._sandbox.insecure:
                envelope.logs.insert(0, _INSECURE_NOTICE)
            self.logs = envelope.logs
            worker.raise_limit_hit(envelope.logs)
            return unwrap(envelope)
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
        await worker.finished()
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
        wire = check_shape(value["__response__"], WireResponse, "response")
        problem = response_problem(wire.status, wire.headers)
        if problem is not None:  # the worker's Response refuses these: a worker that lies
            raise WorkerCrashed(f"the worker sent a malformed response: {problem}")
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
                worker.stream_closed()

        response = Response(wire.status, wire.headers, b"", read, release)
        if worker is not None:  # a drain waits for the stream, not only for the fetch
            worker.stream_opened()
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
