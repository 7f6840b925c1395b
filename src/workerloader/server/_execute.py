"""``POST /execute``: run a snippet as the body of an async function in a fresh worker."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import math
import time
import uuid
from typing import Any

from .. import Limits, Loader, WorkerCode, WorkerStub
from .._errors import WallTimeExceeded, WorkerCrashed, WorkerError, WorkerLoadError
from ..rpc import RpcStub

__all__ = ["ExecuteOutcome", "NotJsonError", "execute", "failure_status", "to_json"]

_closing: set[asyncio.Future[None]] = set()  # workers of answered executions, stopping

_STOP_AFTER_S = 0.003
"""How long after its answer an execution's worker is stopped. Stopping it (the kill, the wait
for its exit, freeing its descriptors and cgroup) takes the service's loop a few steps of
~0.1 ms; taken at once, they met the client's next request, sent as soon as the answer came;
a few milliseconds on, they fall while the loop waits for that request's own worker. Cold
``POST /execute`` p50 from one client: lower in 14 of 18 alternating rounds (medians of the
last 10: 2.85 against 3.17 ms); new executions/s on four connections unchanged. Killing it at
once and freeing the rest later was slower again (p50 higher in 9 of 10 rounds): its exit and
end of file then met the next request instead. Work the code left running (a task) goes on
until the kill: its binding calls in those milliseconds are served, as they were in the one
or so the stop took before; none of it reaches the answer."""

_SNIPPET = "execute.py"
"""The snippet's file name in tracebacks; a function-body main module, which the worker
compiles at load (a syntax error is a load error with its line) and runs by ``execute()``."""


class ExecuteOutcome:
    """The JSON answer of ``/execute`` and its HTTP status."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body


class NotJsonError(ValueError):
    """A result holds a value JSON cannot carry (an infinite or NaN float, a cycle); the
    message says where. The caller's code failed to give an answer: 422, never a 500."""


def to_json(value: object, where: str = "result", _open: set[int] | None = None) -> Any:
    """``value`` as JSON data: tuples and sets as lists, bytes as base64, dates as ISO text.
    Raises NotJsonError, naming ``where`` the value sits, for an infinite or NaN float or a
    container inside itself (``_open``: the containers being converted)."""
    if _open is None:
        _open = set()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJsonError(
                f"{where} is {value!r}, which JSON cannot carry (return it as a string, or None)"
            )
        return value
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in _open:
            raise NotJsonError(f"{where} contains itself (a cycle), which JSON cannot carry")
        _open.add(id(value))
        try:
            if isinstance(value, dict):
                return _json_object(value, where, _open)
            return [to_json(v, f"{where}[{i}]", _open) for i, v in enumerate(value)]
        finally:
            _open.discard(id(value))
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, RpcStub):
        raise NotJsonError(
            f"{where} is a function or an object passed by reference, which JSON cannot carry "
            "(return data: its fields, or what calling it gives)"
        )
    return repr(value)


def _json_object(value: dict[Any, Any], where: str, _open: set[int]) -> dict[str, Any]:
    """``value`` as a JSON object: keys as text. Raises NotJsonError for two keys with one text
    (``1`` and ``"1"``), which JSON would make one, losing a value."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        text = key if isinstance(key, str) else str(key)  # ints crossed: under 1000 digits
        if text in out:
            raise NotJsonError(
                f"{where} has two keys that are both {text!r} as JSON text, which would "
                "keep one value of the two (make the keys distinct strings)"
            )
        out[text] = to_json(item, f"{where}[{key!r}]", _open)
    return out


def _stop(stub: WorkerStub) -> None:
    """Stop an answered execution's worker, in the background."""
    _closing.add(task := asyncio.ensure_future(stub.aclose()))
    task.add_done_callback(_closing.discard)


def failure_status(exc: BaseException) -> int:
    """The status of a call that failed: 504 out of wall time, 502 the worker died, else 422
    (the worker's code failed)."""
    if isinstance(exc, WallTimeExceeded):
        return 504
    if isinstance(exc, WorkerCrashed):
        return 502
    return 422


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, WorkerError):
        return {"type": exc.type_name, "message": exc.message, "traceback": exc.traceback}
    if isinstance(exc, WorkerLoadError):
        return {
            "type": exc.type_name,
            # The message alone: its file, line and type have fields of their own.
            "message": exc.message.removeprefix(f"{exc.type_name}: "),
            "traceback": None,
            "file": exc.file,
            "line": exc.line,
        }
    notes = "\n".join(getattr(exc, "__notes__", ()))
    message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    return {"type": type(exc).__name__, "message": message, "traceback": notes or None}


async def execute(
    loader: Loader, code: str, limits: Limits, sdk: dict[str, object]
) -> ExecuteOutcome:
    """Run ``code`` once in a new worker; 200 with the result, 422 if the code failed, 504 if
    it ran out of wall time, 502 if the worker died, 429/… never from here."""
    started = time.perf_counter()
    worker = WorkerCode(
        main_module=_SNIPPET,
        modules={_SNIPPET: {"body": code}},
        env={"SDK": sdk},
        limits=limits,
    )
    stub = None
    logs: list[str] = []
    try:
        stub = loader.get(None, lambda: worker)  # loads with the first call: one round trip
        result = await stub.get_entrypoint().execute()
        logs = stub.logs
        body: dict[str, Any] = {"ok": True, "result": to_json(result)}
        status = 200
    except Exception as exc:
        logs = getattr(exc, "logs", None) or (stub.logs if stub else [])
        body = {"ok": False, "error": _error(exc)}
        status = failure_status(exc)
    finally:
        if stub is not None:
            # Stopping the worker is not the caller's business: it comes after the answer.
            asyncio.get_running_loop().call_later(_STOP_AFTER_S, _stop, stub)
    body["logs"] = logs
    body["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
    body["cpu_ms"] = round(stub.cpu_ms, 3) if stub is not None else 0.0
    return ExecuteOutcome(status, body)
