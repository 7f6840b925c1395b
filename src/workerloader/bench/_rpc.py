"""RPC benchmark: call round trip and pipelined throughput between two processes.

Both sides run in separate processes joined by a Unix socketpair. The baseline makes the same
calls through ``multiprocessing.connection`` with pickle in the same run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from .. import rpc
from ..rpc._loop import DEFAULT_SPIN_US
from ..rpc._loop import run as run_loop
from ._report import Figure, percentile

__all__ = ["run_rpc_bench"]

_WINDOW = 256
"""Calls kept in flight for the pipelined figures."""


class _Calc(rpc.RpcTarget):
    async def add(self, a: int, b: int) -> int:
        return a + b


def _serve_rpc(sock: socket.socket, spin_us: int) -> None:
    async def main() -> None:
        session = await rpc.connect(sock, _Calc())
        await session.wait_closed()

    run_loop(main(), spin_us=spin_us)


def _serve_pickle(conn: Connection) -> None:
    while True:
        try:
            a, b = conn.recv()
        except EOFError:
            return
        conn.send(a + b)  # the same work as _Calc.add, without a coroutine


def _fork(close_in_child: Connection | socket.socket, target: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            close_in_child.close()  # so the child sees EOF when the parent closes its end
            target(*args)  # type: ignore[operator]
        finally:
            os._exit(0)
    return pid


async def _measure_rpc(
    sock: socket.socket, calls: int, pipelined: int
) -> tuple[list[float], float]:
    session = await rpc.connect(sock)
    main = session.main
    for _ in range(500):
        await main.add(1, 2)
    samples: list[float] = []
    for i in range(calls):
        t0 = time.perf_counter_ns()
        await main.add(i, 1)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    # Pipelined: _WINDOW calls kept in flight all the time (each lane awaits its calls one
    # after another), so neither side waits for the other between batches.
    per_lane = pipelined // _WINDOW

    async def lane() -> None:
        for i in range(per_lane):
            await main.add(i, 1)

    start_s = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(_WINDOW)))
    rate = per_lane * _WINDOW / (time.perf_counter() - start_s)
    await session.aclose()
    return samples, rate


def _measure_pickle(calls: int, pipelined: int) -> tuple[list[float], float]:
    from multiprocessing import Pipe

    parent, child = Pipe()
    pid = _fork(parent, _serve_pickle, child)
    child.close()
    for _ in range(500):
        parent.send((1, 2))
        parent.recv()
    samples: list[float] = []
    for i in range(calls):
        t0 = time.perf_counter_ns()
        parent.send((i, 1))
        parent.recv()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    # The same window for the baseline: _WINDOW calls sent ahead, one more for each answer.
    start_s = time.perf_counter()
    for i in range(_WINDOW):
        parent.send((i, 1))
    for i in range(_WINDOW, pipelined):
        parent.recv()
        parent.send((i, 1))
    for _ in range(_WINDOW):
        parent.recv()
    rate = pipelined / (time.perf_counter() - start_s)
    parent.close()
    os.waitpid(pid, 0)
    return samples, rate


def _measure_ours(spin_us: int, calls: int, pipelined: int) -> tuple[list[float], float]:
    a, b = socket.socketpair()
    pid = _fork(a, _serve_rpc, b, spin_us)
    b.close()
    try:
        return run_loop(_measure_rpc(a, calls, pipelined), spin_us=spin_us)
    finally:
        os.waitpid(pid, 0)


def _codec_us(encode: Callable[[], bytes], decode: Callable[[bytes], object]) -> float:
    """Microseconds to encode and decode one typical call frame."""
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        decode(encode())
    return (time.perf_counter() - start) / n * 1e6


def _codec_figures() -> list[Figure]:
    """Why msgspec: the same Push frame through msgspec's typed structs and through msgpack."""
    try:
        import msgpack  # type: ignore[import-untyped]  # only for this comparison
    except ImportError:  # installed with the test extras
        return []

    from ..rpc._wire import Push, decode_message, encode_frame

    push = Push(7, 0, ["add"], [[1, 2], {}], True)
    ours = _codec_us(lambda: encode_frame(push)[4:], decode_message)
    as_list = [1, 7, 0, ["add"], [[1, 2], {}], True]
    packer = msgpack.Packer()
    base = _codec_us(
        lambda: packer.pack(as_list), lambda b: msgpack.unpackb(b, strict_map_key=False)
    )
    return [Figure("codec: encode+decode a call frame", ours, "µs", base, "msgpack 1.x")]


def run_rpc_bench(calls: int = 5000, pipelined: int = 20000) -> list[Figure]:
    """Measure and return the figures of issue "Capability RPC protocol" (p50/p99 µs, calls/s)."""
    base_samples, base_rate = _measure_pickle(calls, pipelined)
    samples, rate = _measure_ours(DEFAULT_SPIN_US, calls, pipelined)
    plain_samples, plain_rate = _measure_ours(0, calls, pipelined)
    base = "multiprocessing.connection + pickle"
    return [
        Figure(
            "round trip p50",
            percentile(samples, 0.5),
            "µs",
            percentile(base_samples, 0.5),
            base,
            target=60,
        ),
        Figure(
            "round trip p99", percentile(samples, 0.99), "µs", percentile(base_samples, 0.99), base
        ),
        Figure(
            "pipelined calls",
            rate,
            "calls/s",
            base_rate,
            base,
            target=30_000,
            higher_is_better=True,
        ),
        Figure(
            "round trip p50, plain asyncio loop",
            percentile(plain_samples, 0.5),
            "µs",
            percentile(base_samples, 0.5),
            base,
        ),
        Figure(
            "pipelined calls, plain asyncio loop",
            plain_rate,
            "calls/s",
            base_rate,
            base,
            higher_is_better=True,
        ),
        *_codec_figures(),
    ]
