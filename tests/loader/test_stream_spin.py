"""A worker spins after an answer only while calls come in a stream (see runtime._main.serve):
the runtime marks a call that arrived within ``_STREAM_GAP_S`` of the answer before it."""

from __future__ import annotations

import asyncio

from workerloader.runtime import _main
from workerloader.runtime._main import WorkerRuntime

MAIN = "async def fetch(request, env, ctx):\n    return 'ok'\n"
REQUEST = {"url": "https://w/", "method": "GET", "headers": {}, "body": b""}


async def test_a_call_right_after_an_answer_is_in_a_stream_and_a_late_one_is_not() -> None:
    runtime = WorkerRuntime()
    assert runtime.load({"main_module": "main.py", "modules": {"main.py": MAIN}}) is None
    first = await runtime.fetch(None, REQUEST, None)
    assert first["value"] == "ok"
    assert runtime.streaming is False  # nothing came before it
    await runtime.fetch(None, REQUEST, None)
    assert runtime.streaming is True
    await asyncio.sleep(_main._STREAM_GAP_S * 2)
    await runtime.fetch(None, REQUEST, None)
    assert runtime.streaming is False
