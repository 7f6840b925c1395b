"""The worker's side of the host ↔ worker session: ``serve`` runs it over the inherited channel.

The host drives a ``WorkerRuntime``: ``load`` the code once, then ``invoke``/``fetch`` per call.
Each call's answer is an envelope ``{"value": ...} | {"error": {...}}`` plus ``"logs"``, so logs
travel with results and errors alike.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import io
import logging
import resource
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from .. import rpc
from ..rpc._core import receive_error_as
from ..rpc._loop import new_event_loop, renew_descriptors, run, set_spin
from ..sandbox._output import OutputWriter
from . import _execute, workers
from ._modules import ModuleMap

__all__ = ["SESSION_LIMITS", "WorkerRuntime", "make_loop", "prepare", "serve", "warm_up"]

_LOG_CAP = 64 * 1024

SESSION_LIMITS = rpc.RpcLimits(max_frame_bytes=4 << 20)
"""The host ↔ worker session's limits (both ends): frames carry whole request and response
bodies, which the service caps at 1 MiB, plus their framing."""

STREAM_SPIN_US = 600
"""A worker's spin window while it waits on the host or calls come in a stream."""
_STREAM_GAP_S = 0.002
"""A call that arrives within this of the worker's previous answer is part of a stream."""
_monotonic = time.monotonic
_process_time_ns = time.process_time_ns  # bound here: worker code may replace time's
_background: set[asyncio.Future[object]] = set()  # ctx.wait_until work still running

base_vm_bytes = 0
"""Virtual memory mapped before confinement (measured then: /proc is closed afterwards)."""


def measure_base_vm() -> None:
    """Record ``base_vm_bytes``; called by the zygote before it forks workers (a worker cannot
    read /proc once confined)."""
    global base_vm_bytes
    with open("/proc/self/statm") as f:
        base_vm_bytes = int(f.read().split()[0]) * resource.getpagesize()


_calls: contextvars.ContextVar[_CallLog | None] = contextvars.ContextVar("workerloader_call")


class OutputLimitExceeded(BaseException):
    """Raised inside the worker when a call prints more than its cap; ``except Exception`` in
    user code cannot swallow it."""


class SubrequestLimitExceeded(BaseException):
    """Raised inside the worker by a binding call over the call's ``Limits.subrequests`` (the
    host refused it); ``except Exception`` in user code cannot swallow it, and the host fails
    the call whatever the code does with it."""


_output: OutputWriter | None = None  # the copy the host reads if a limit ends the call


def share_output(fd: int) -> None:
    """Copy each call's output into the shared output file ``fd`` as well (see
    ``sandbox._output``); called in a new worker before it is confined."""
    global _output
    _output = OutputWriter(fd)


class _CallLog:
    """A call's output: its lines, capped; started anew (and the shared copy with it) for
    each call."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.lines: list[str] = []
        self.partial = ""
        if _output is not None:
            _output.reset()

    def overflow_message(self) -> str:
        return f"the call wrote more than {self.cap} characters of output"

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > self.cap:
            raise OutputLimitExceeded(self.overflow_message())
        self.partial += text
        *done, self.partial = self.partial.split("\n")
        self.lines.extend(done)
        if _output is not None:
            _output.write(text)

    def finish(self) -> list[str]:
        if self.partial:
            self.lines.append(self.partial)
            self.partial = ""
        return self.lines


class _Stream(io.TextIOBase):
    """sys.stdout/sys.stderr: route writes to the current call's log."""

    def write(self, text: str) -> int:
        log = _calls.get(None)
        if log is not None:
            log.write(text)
        return len(text)


def _user_traceback(exc: BaseException, user_files: set[str]) -> str:
    """The exception with the frames of the user's files only (no header when none is: an
    answer that could not be sent, say, was raised in the runtime's code)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in user_files]
    header = "Traceback (most recent call last):\n" if frames else ""
    return (
        header
        + "".join(traceback.format_list(frames))
        + "".join(traceback.format_exception_only(exc))
    )


def _error_dict(exc: BaseException, user_files: set[str]) -> dict[str, str]:
    single = len(exc.args) == 1 and isinstance(exc.args[0], str)
    return {
        "type": type(exc).__name__,
        # Where the class is from: the host takes a ValueError or a PermissionDenied as
        # Python's or workerloader's only if it is (not the code's own class of that name).
        "module": type(exc).__module__,
        "message": exc.args[0] if single else str(exc),
        "traceback": _user_traceback(exc, user_files),
    }


class WorkerRuntime(rpc.RpcTarget):
    """The host's handle on this worker."""

    def __init__(self) -> None:
        self._modules: ModuleMap | None = None
        self._entrypoints: dict[str | None, Any] = {}
        self._env = workers.Env({})
        self._log_cap = _LOG_CAP
        self.streaming = False
        """The latest call came within ``_STREAM_GAP_S`` of the answer before it."""
        self._answered_at = float("-inf")

    def load(self, code: dict[str, Any]) -> dict[str, Any] | None:
        """Load the worker's code; None on success, else ``{"type", "message", "file", "line"}``."""
        limits = code.get("limits") or {}
        memory_mb = limits.get("memory_mb")
        if memory_mb:
            # Virtual memory the interpreter already maps, plus the worker's allowance.
            cap = base_vm_bytes + int(memory_mb) * (1 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        self._log_cap = int(limits.get("output_bytes") or _LOG_CAP)
        try:
            self._modules = ModuleMap(code["modules"])
        except ValueError as exc:
            return {"type": "ValueError", "message": str(exc), "file": None, "line": None}
        self._modules.install()
        workers.modules.update(self._modules.data)
        self._env = workers.Env(code.get("env") or {})
        workers.sdk._bind(code.get("env", {}).get("SDK"))
        workers._outbound = code.get("outbound")
        main = code["main_module"]
        name = main[:-3].replace("/", ".") if main.endswith(".py") else None
        if name is None or name not in self._modules.sources:
            return {
                "type": "ValueError",
                "message": f"main module {main!r} is not a .py entry of the module map "
                f"(its entries: {sorted(code['modules'])})",
                "file": None,
                "line": None,
            }
        log = _CallLog(self._log_cap)
        _calls.set(log)
        try:
            module = self._modules.import_main(name)
        except SyntaxError as exc:
            return {
                "type": "SyntaxError",
                "message": exc.msg,
                "file": exc.filename,
                "line": exc.lineno,
            }
        except BaseException as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            user = [f for f in frames if f.filename in self._modules.user_files()]
            last = user[-1] if user else None
            return {
                "type": type(exc).__name__,
                "message": str(exc),
                "file": last.filename if last else None,
                "line": last.lineno if last else None,
            }
        finally:
            _calls.set(None)
        if name in self._modules.bodies:  # a function body (POST /execute): run by execute()
            _execute.Execute._body = module
            self._entrypoints[None] = _execute.Execute
            return None
        # The main module's public names are its exports, wherever the class was defined
        # (``from app import Calculator`` exports Calculator, as a re-export does in JS).
        for attr, value in vars(module).items():
            if (
                not attr.startswith("_")
                and inspect.isclass(value)
                and issubclass(value, workers.WorkerEntrypoint)
                and value is not workers.WorkerEntrypoint
            ):
                self._entrypoints[None if attr == "Default" else attr] = value
        fetch = getattr(module, "fetch", None)
        if None not in self._entrypoints and inspect.iscoroutinefunction(fetch):
            self._entrypoints[None] = fetch
        if not self._entrypoints:
            return {
                "type": "ValueError",
                "message": "the main module exports no entrypoint: define class "
                "Default(WorkerEntrypoint), a module-level async def fetch(request, env, ctx), "
                "or named WorkerEntrypoint classes",
                "file": main,
                "line": None,
            }
        return None

    async def invoke(
        self,
        entrypoint: str | None,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        props: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Call ``method`` on a new instance of ``entrypoint``; the result envelope."""
        return await self._call(entrypoint, method, args, kwargs, props)

    async def fetch(
        self, entrypoint: str | None, request: dict[str, Any], props: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Run the entrypoint's ``fetch`` on a request; the envelope's value is a response."""
        req = workers.Request.from_wire(request)
        return await self._call(entrypoint, "fetch", [req], {}, props)

    async def _call(
        self,
        entrypoint: str | None,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        props: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        self.streaming = _monotonic() - self._answered_at < _STREAM_GAP_S
        # Each call shows its own warnings (the "default" action prints one per place once per
        # process): the marks of what was shown expire when the filters change, and re-adding
        # the runtime's own filter in place (no change at all) tells the module so.
        warnings.simplefilter("default", append=True)
        log = _CallLog(self._log_cap)
        # Set, not reset by token: the first step of this coroutine runs in the RPC driver's
        # context and the rest, if it suspends, in a task's copy of it.
        _calls.set(log)
        ctx = workers.Context(props)
        try:
            value = await self._dispatch(entrypoint, method, args, kwargs, ctx)
            if isinstance(value, workers.Response):
                value = {"__response__": value.to_wire()}
            envelope: dict[str, Any] = {"value": value}
        except asyncio.CancelledError:
            raise  # the session's, not the code's: the call is being torn down
        except BaseException as exc:
            # sys.exit(), KeyboardInterrupt or the code's own BaseException subclass end the
            # call, not the worker: its caller gets the error.
            user_files = self._modules.user_files() if self._modules else set()
            envelope = {"error": _error_dict(exc, user_files)}
        finally:
            _calls.set(None)
        if log.size > log.cap and "error" not in envelope:
            # The limit error was swallowed (``except BaseException``): the call still failed.
            envelope = {"error": _error_dict(OutputLimitExceeded(log.overflow_message()), set())}
        envelope["logs"] = log.finish()
        # The process's CPU clock, exact here (the host's reading lags while this process runs):
        # the host takes the call's CPU time from it (never below its own reading).
        envelope["cpu_ns"] = _process_time_ns()
        self._answered_at = _monotonic()
        for awaitable in ctx._waiting:
            task = asyncio.ensure_future(awaitable)
            _background.add(task)
            task.add_done_callback(_background.discard)
        return envelope

    async def _dispatch(
        self,
        entrypoint: str | None,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: workers.Context,
    ) -> Any:
        target = self._entrypoints.get(entrypoint)
        if target is None:
            raise LookupError(
                f"the worker has no entrypoint {entrypoint or 'Default'!r}"
                f" (it exports {[e or 'Default' for e in self._entrypoints]})"
            )
        if not inspect.isclass(target):  # a module-level fetch(request, env, ctx)
            if method != "fetch":
                raise AttributeError(f"the default entrypoint has no method {method!r}")
            return await target(*args, self._env, ctx)
        if method.startswith("_") or (
            method not in vars(target)
            and not any(
                method in vars(base)
                for base in target.__mro__[:-1]
                if base is not workers.WorkerEntrypoint
            )
        ):
            raise AttributeError(f"entrypoint {target.__name__!r} has no method {method!r}")
        instance = cast(Any, target)(ctx, self._env)
        result = getattr(instance, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


def _install_streams() -> None:
    sys.stdout = _Stream()
    sys.stderr = _Stream()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True)
    warnings.simplefilter("default")
    # As Python's own defaults: a user's unclosed socket or file, collected during a call,
    # would otherwise log a warning that names the runtime's code, not theirs.
    warnings.filterwarnings("ignore", category=ResourceWarning)


_WARMUP_MODULE = "_workerloader_warmup"
_WARMUP_SOURCE = """
from workers import WorkerEntrypoint, Response

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(await request.text())

    async def ping(self, value):
        print(value)
        return value
"""
_WARMUP_BODY = "_workerloader_warmup_body"


def sdk_shaped_env() -> dict[str, Any]:
    """An ``env`` shaped as a service's workers get it (``Loader.sdk``: a capability for each
    store, a context dict), with capabilities that do nothing: the warm-up and the first-call
    probe load it, so the code and pages that binding ``workers.sdk`` touches are warm in
    every worker (cold starts with it took ~0.2 ms more of the worker's CPU without)."""
    stores = {name: rpc.RpcTarget() for name in ("db", "kv", "sql", "blobs", "ai")}
    context = {
        "user_id": None,
        "namespace": "default",
        "authenticated": False,
        "permissions": ["read"],
    }
    return {"SDK": {**stores, "api": None, "context": context}}


def _warm_up_code(main: str, source: object) -> dict[str, Any]:
    return {
        "main_module": f"{main}.py",
        "modules": {f"{main}.py": source},
        "env": sdk_shaped_env(),
        "limits": {},
    }


async def _warm_up_worker(code: dict[str, Any], *calls: Callable[[Any], Awaitable[Any]]) -> None:
    """Load ``code`` into a new ``WorkerRuntime`` over a socket session and make ``calls``."""
    host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = await rpc.connect(worker_end, WorkerRuntime())
    host = await rpc.connect(host_end)
    await host.main.load(code)
    for call in calls:
        await call(host.main)
    await host.aclose()
    await worker.aclose()


def _forget_warm_up() -> None:
    """Remove what the warm-up's loads installed (finders, modules, data, ``Execute._body``)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, ModuleMap)]
    sys.modules.pop(_WARMUP_MODULE, None)
    sys.modules.pop(_WARMUP_BODY, None)
    _execute.Execute._body = None
    workers.modules.clear()
    workers.sdk._bind(None)  # its stubs were the warm-up session's


async def _warm_up() -> None:
    """Run one load and a few calls through the real code paths, over a socket session.

    Run in the zygote before it forks: the first run of a code path imports lazily loaded
    modules, fills caches and specializes bytecode, all of which then sits in memory the
    workers share instead of being redone (and copied) in each. Nothing of the run stays: the
    module, its finder and the session are removed.
    """
    request = workers.Request("https://warm.up/", "POST", {"a": "b"}, b"body").to_wire()
    # One worker with a module, one with a function body (POST /execute's path): each process
    # loads once.
    await _warm_up_worker(
        _warm_up_code(_WARMUP_MODULE, _WARMUP_SOURCE),
        lambda w: w.invoke(None, "ping", [[1, "x", {"k": 2.5}]], {}, {"p": 1}),
        lambda w: w.fetch(None, request, None),
        lambda w: w.invoke(None, "nope", [], {}, None),  # the error path too
    )
    await _warm_up_worker(
        _warm_up_code(_WARMUP_BODY, {"body": "return [1, 'x', {'k': 2.5}]"}),
        lambda w: w.invoke(None, "execute", [], {}, None),
    )
    _forget_warm_up()


def warm_up() -> None:
    """Run the warm-up again (see ``prepare``): the zygote does, after it has replaced code
    objects with copies that have not been specialized yet."""
    run(_warm_up())


def prepare() -> None:
    """Make this process the template workers are forked from: install the ``workers`` module
    and the per-call output streams, and run the warm-up once here, so that every worker
    inherits its effects (imports done, code specialized) instead of repeating them."""
    sys.modules["workers"] = workers
    receive_error_as("workerloader.SubrequestLimitExceeded", SubrequestLimitExceeded)
    _install_streams()
    warm_up()


def serve(channel: socket.socket, ready: Callable[[], object] | None = None) -> int:
    """Run the worker's session until the host closes it; the process exit code, for a caller
    that then ends the process (the event loop is left as it is). ``prepare`` must have run in
    this process or the one it was forked from. ``ready`` is called once the session runs,
    before it reads its first message (the zygote's page probe looks there)."""

    async def main() -> None:
        runtime = WorkerRuntime()
        session = await rpc.connect(channel, runtime, limits=SESSION_LIMITS)
        if ready is not None:
            ready()
        # Spin (see rpc._loop) while a binding call waits for the host's answer, and after an
        # answer while calls come in a stream (the next one then arrives within ~0.3 ms: over
        # HTTP, the service answers its client, which sends the next request). Not while
        # pooled, not after a one-shot worker's first (and last) answer, not between sporadic
        # calls. Measured on warm HTTP fetches from one client, alternating workers in one
        # service (four rounds): p50 0.35 ms with 600 µs here and in the service (cli serve),
        # 0.46 ms with 200 µs in both, 0.45 ms with 600 µs here alone.
        set_spin(STREAM_SPIN_US, lambda: session.awaiting_answers > 0 or runtime.streaming)
        await session.wait_closed()

    # A bare loop, not asyncio.run: the process ends with os._exit (or a kill) once the session
    # closes, so a runner's setup (a SIGINT handler, a context copy) and orderly teardown would
    # be work for nothing in every worker.
    global _loop
    loop, _loop = _loop, None  # a process runs the zygote's loop once at most
    if loop is None:
        loop = new_event_loop(0)
        asyncio.set_event_loop(loop)
    else:
        # Not made the thread's current loop as well: the worker's code only runs inside it,
        # where asyncio finds the running loop, and that would cost each worker ~15 pages
        # (measured: 1.35 against 1.29 MB per idle worker).
        renew_descriptors(loop)
    loop.run_until_complete(main())
    return 0


_loop: asyncio.AbstractEventLoop | None = None


def make_loop() -> None:
    """Make, in the zygote, the event loop that each worker forked from it runs (``serve``):
    its objects are then the zygote's, shared, instead of built anew in every worker (~0.3 ms
    and ~50 pages each, measured). Its descriptors are not shared: ``serve`` gives the worker's
    copy its own."""
    global _loop
    _loop = new_event_loop(0)
