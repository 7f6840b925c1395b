"""The Loader: sandboxed workers by id, started lazily, kept warm, evicted by LRU and idle TTL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from .. import rpc
from .._errors import CpuLimitExceeded
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
from ..bindings._quota import BucketUsage
from ..bindings._sqlite import open_database
from ..rpc._loop import spin_unless
from ..runtime._main import SESSION_LIMITS
from ..runtime.workers import WorkerEntrypoint
from ..sandbox import Sandbox, WorkerProcess
from ._code import WorkerCode
from ._exports import Exports
from ._stub import WorkerStub
from ._worker import CPU_SLACK_NS, RunningWorker, in_background, stop_worker

__all__ = ["Loader", "valid_namespace"]

_E = TypeVar("_E", bound=type[WorkerEntrypoint])
_SDK_CACHE_SIZE = 1024
"""Binding sets ``Loader.sdk`` keeps (one per distinct scope); all are dropped when full."""
_SDK_STORES = ("db", "kv", "sql", "blobs")

_BETWEEN_CALLS_POLL_S = 0.1
_BETWEEN_CALLS_RECENT_S = 10.0
_BETWEEN_CALLS_ALL_EVERY = 10
"""CPU a worker uses between calls is read every ``_BETWEEN_CALLS_POLL_S`` for
``_BETWEEN_CALLS_RECENT_S`` after its last call, and every ``_BETWEEN_CALLS_ALL_EVERY`` polls
after that (one clock read per worker: ~1 ms per poll with 1,000 live workers)."""


DEFAULT_STORAGE_QUOTA_MB = 1024
"""Each namespace's quota in each store, unless the host sets another (``storage_quota_mb``):
a tenant's code cannot fill the host's disk, and a gigabyte is room enough for what a worker
keeps in KV, documents, SQL or blobs on one machine."""

_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def valid_namespace(name: str) -> str:
    """``name`` if it is a valid namespace or store name (letters, digits, `_ . -`, up to 128,
    no `..`), else ValueError."""
    if not isinstance(name, str) or not _NAMESPACE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid namespace or name {name!r} (letters, digits, _ . -)")
    return name


def _grants(read: bool, write: bool) -> frozenset[str]:
    return frozenset({"read"} if read else set()) | frozenset({"write"} if write else set())


class _Stores:
    """The SQLite databases behind KV and documents, opened on first use."""

    def __init__(self, data_dir: Path, quota_bytes: int | None) -> None:
        self.kv = KvStore(open_database(data_dir / "kv.sqlite3"), quota_bytes)
        self.docs = DocumentStore(open_database(data_dir / "documents.sqlite3"), quota_bytes)

    def close(self) -> None:
        """Stop the stores' threads and close their databases (blocks until their calls end)."""
        self.kv.close()
        self.docs.close()


class Loader:
    """Loads worker code into sandboxed workers on demand (see ``docs/design.md``).

    Use as ``async with Loader() as loader``. ``max_workers`` bounds the warm workers (least
    recently used evicted first); workers idle longer than ``idle_ttl_s`` are stopped.

    Where namespaces, seccomp or Landlock are missing (or not root), entering refuses with
    ``SandboxUnavailable`` unless ``insecure=True``; then workers run unconfined and every
    call's logs say so.

    ``storage_quota_mb`` is the most each namespace may keep in each of its stores (KV,
    documents, a SQL database, a blob bucket); a write past it raises ``QuotaExceeded``.
    None: no quota (the host's disk is the limit).

    ``sandbox_python`` is the interpreter workers run on (default: this process's own). It must
    import this version of workerloader; on Python 3.12+ workers share most of the zygote's
    memory. The host itself may then run on another version, such as a distribution's
    optimized 3.11 (see ``docs/configuration.md``).
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
        storage_quota_mb: int | None = DEFAULT_STORAGE_QUOTA_MB,
        sandbox_python: str | None = None,
    ) -> None:
        if storage_quota_mb is not None and storage_quota_mb < 1:
            raise ValueError("storage_quota_mb must be at least 1 (or None: no quota)")
        self.data_dir = Path(data_dir)
        self.storage_quota_bytes = None if storage_quota_mb is None else storage_quota_mb << 20
        """The most each namespace may keep in each store (None: no quota)."""
        self._bucket_usage: dict[Path, BucketUsage] = {}  # one count per bucket directory
        self.ai_config = ai
        self.max_workers = max_workers
        self.idle_ttl_s = idle_ttl_s
        self._sandbox = Sandbox(pool_size=pool_size, insecure=insecure, python=sandbox_python)
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
        self._workers: set[RunningWorker] = set()  # every running worker, cached or not
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
            await stop_worker(*self._ready.popleft())
        self._stubs.clear()
        for task in list(self._evicting):
            task.cancel()  # the loop below stops their workers, calls in flight or not
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for worker in list(self._workers):
            await self._forget(worker)
        await self._sandbox.aclose()
        if self._stores_cache is not None:  # no worker is left to call them
            stores, self._stores_cache = self._stores_cache, None
            await asyncio.to_thread(stores.close)

    async def _forget(self, worker: RunningWorker) -> None:
        self._workers.discard(worker)
        self._forgetting += 1
        try:
            await worker.aclose()
        finally:
            self._forgetting -= 1

    def _stop_soon(self, stopping: Awaitable[None]) -> None:
        """Stop a worker in the background; ``aclose`` waits for it."""
        in_background(stopping, self._stopping)

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
                in_background(oldest._close_when_idle(), self._evicting)
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

    async def evict(self, worker_id: str, *, drain: bool = False) -> None:
        """Stop the warm worker ``worker_id`` now, if any (a call in flight fails with
        ``WorkerCrashed``). With ``drain``, the calls in flight finish first, in the
        background: the id is free at once (the next ``get`` starts a fresh worker), its old
        worker stops once idle."""
        stub = self._stubs.pop(worker_id, None)
        if stub is None:
            return
        if drain:
            in_background(stub._close_when_idle(), self._evicting)
        else:
            await stub.aclose()

    # -- bindings ---------------------------------------------------------------------------

    def kv(self, namespace: str, *, read: bool = True, write: bool = True) -> KvNamespace:
        """The KV namespace ``namespace``, durable under the data dir."""
        return KvNamespace(self._stores().kv, valid_namespace(namespace), _grants(read, write))

    def db(self, namespace: str, *, read: bool = True, write: bool = True) -> Documents:
        """The document collections of ``namespace`` (``sdk.db``)."""
        return Documents(self._stores().docs, valid_namespace(namespace), _grants(read, write))

    def sql(self, name: str, *, read: bool = True, write: bool = True) -> SqlDatabase:
        """The SQL database ``name`` (one SQLite file per name)."""
        path = self.data_dir / "sql" / f"{valid_namespace(name)}.sqlite3"
        db = self._sql_dbs.get(path)
        if db is None:
            db = SqlDatabase.open(path, frozenset(), quota_bytes=self.storage_quota_bytes)
            self._sql_dbs[path] = db
        return db.with_grants(_grants(read, write))

    def blobs(self, bucket: str, *, read: bool = True, write: bool = True) -> BlobBucket:
        """The blob bucket ``bucket`` (files under the data dir, written atomically)."""
        root = self.data_dir / "blobs" / valid_namespace(bucket)
        usage = self._bucket_usage.get(root)
        if usage is None:
            what = f"the blob bucket {bucket!r}"
            usage = self._bucket_usage[root] = BucketUsage(root, self.storage_quota_bytes, what)
        return BlobBucket(root, _grants(read, write), usage)

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
            self._stores_cache = _Stores(self.data_dir, self.storage_quota_bytes)
        return self._stores_cache

    def _drop_soon(self, worker: RunningWorker) -> None:
        """Stop an uncached worker whose stub is gone (the garbage collector calls this, in
        whatever thread collected the stub)."""
        loop = self._loop
        if loop is None or self._closing or worker not in self._workers:
            return  # (stopped already: the common case, the stub's aclose came first)
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(self._drop, worker)

    def _drop(self, worker: RunningWorker) -> None:
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
                if used_ns > worker.limits.cpu_ms * 1_000_000 + CPU_SLACK_NS:
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
