"""``RpcPromise.send()``: a call goes out now, ahead of calls made after it, and is awaited later.

Each test runs over both transports: ``memory_pair`` and two ``connect`` sessions over a real
``socket.socketpair()``.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator

import pytest

from workerloader import RemoteError
from workerloader.rpc import RpcPromise, RpcSession, RpcStub, RpcTarget, connect, memory_pair

EMPTY = {"exports": 0, "imports": 0, "questions": 0, "answers": 0}


class SetupError(Exception):
    """Not a builtin: crosses as ``RemoteError``."""


class Counter(RpcTarget):
    def __init__(self, start: int) -> None:
        self.value = start

    def bump(self) -> int:
        self.value += 1
        return self.value


class Recorder(RpcTarget):
    """Records the order its methods start in."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def first(self, x: int) -> str:
        self.calls.append(f"first({x})")
        await asyncio.sleep(0)
        return f"first:{x}"

    async def second(self, x: int) -> str:
        self.calls.append(f"second({x})")
        return f"second:{x}"

    def plain(self, x: int) -> int:
        self.calls.append(f"plain({x})")
        return x * 10

    def setup(self, name: str) -> None:
        self.calls.append(f"setup({name})")
        if name == "bad":
            raise ValueError(f"cannot set up {name}")
        if name == "custom":
            raise SetupError("custom failure")

    def counter(self, start: int) -> Counter:
        self.calls.append(f"counter({start})")
        return Counter(start)


async def _memory(target: Recorder) -> tuple[RpcSession, RpcSession]:
    return await memory_pair(None, target)


async def _socketpair(target: Recorder) -> tuple[RpcSession, RpcSession]:
    ours, theirs = socket.socketpair()
    caller = await connect(ours)
    callee = await connect(theirs, target)
    return caller, callee


@pytest.fixture(params=["memory", "socketpair"])
async def sessions(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[RpcStub, Recorder]]:
    """A stub for a fresh ``Recorder`` on the other side, and the recorder itself; afterwards
    both sessions' tables must be empty, and the sessions are closed."""
    target = Recorder()
    make = _memory if request.param == "memory" else _socketpair
    caller, callee = await make(target)
    try:
        yield caller.main, target
        # Every promise was awaited and every stub disposed: nothing may stay in the tables.
        for _ in range(100):
            gc.collect()
            await asyncio.sleep(0)
            if caller.table_sizes() == EMPTY and callee.table_sizes() == EMPTY:
                break
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY
    finally:
        await caller.aclose()
        await callee.aclose()
        for _ in range(5):  # let the transports' close callbacks run
            await asyncio.sleep(0)
        assert caller.closed
        assert callee.closed


async def test_a_sent_call_reaches_the_target_before_a_later_one(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    stub, target = sessions
    p = stub.first(1).send()
    assert await stub.second(2) == "second:2"
    assert target.calls == ["first(1)", "second(2)"]
    assert await p == "first:1"
    assert target.calls == ["first(1)", "second(2)"]  # awaiting did not call it again


async def test_without_send_the_call_waits_for_its_await(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    """The contrast that makes the test above mean something: a promise is lazy."""
    stub, target = sessions
    p = stub.first(1)
    assert await stub.second(2) == "second:2"
    assert target.calls == ["second(2)"]
    assert await p == "first:1"
    assert target.calls == ["second(2)", "first(1)"]


async def test_send_returns_the_same_promise_and_sending_twice_sends_once(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    stub, target = sessions
    p = stub.plain(3)
    assert isinstance(p, RpcPromise)
    assert p.send() is p
    assert p.send() is p
    assert await p == 30
    assert p.send() is p  # after the result arrived: nothing more to send
    assert await p == 30
    assert await p == 30
    assert target.calls == ["plain(3)"]


async def test_several_sent_calls_keep_their_order(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    stub, target = sessions
    sent = [stub.plain(i).send() for i in range(5)]
    assert await stub.second(9) == "second:9"
    assert target.calls == [*(f"plain({i})" for i in range(5)), "second(9)"]
    assert [await p for p in reversed(sent)] == [40, 30, 20, 10, 0]


async def test_an_error_of_a_sent_call_surfaces_when_it_is_awaited(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    stub, target = sessions
    bad = stub.setup("bad").send()
    custom = stub.setup("custom").send()
    assert await stub.second(1) == "second:1"  # the failures did not break the session
    assert target.calls == ["setup(bad)", "setup(custom)", "second(1)"]
    with pytest.raises(ValueError, match=r"^cannot set up bad$"):
        await bad
    with pytest.raises(RemoteError, match="custom failure"):
        await custom
    assert await stub.setup("fine").send() is None


async def test_a_sent_call_for_a_capability_can_be_used_afterwards(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    stub, target = sessions
    made = stub.counter(10).send()
    bumped = made.bump()  # built on a promise in flight: sent when awaited
    assert await stub.second(0) == "second:0"
    assert target.calls == ["counter(10)", "second(0)"]
    assert await bumped == 11
    counter = await made
    assert isinstance(counter, RpcStub)
    with counter:
        assert await counter.bump() == 12


async def test_a_call_pipelined_on_a_sent_one_reaches_the_target_after_it(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    stub, target = sessions
    made = stub.counter(0).send()
    assert await made.bump().send() == 1
    counter = await made
    assert isinstance(counter, RpcStub)
    with counter:
        assert await counter.bump() == 2
    assert target.calls == ["counter(0)"]


async def test_a_sent_promise_that_is_dropped_leaves_nothing_behind(
    sessions: tuple[RpcStub, Recorder],
) -> None:
    """Fire and forget: the calls run, and their answers (a capability among them) are released
    on both sides (the fixture checks the tables once the promises are gone)."""
    stub, target = sessions
    stub.plain(1).send()
    stub.counter(1).send()
    assert await stub.second(2) == "second:2"
    assert target.calls == ["plain(1)", "counter(1)", "second(2)"]
