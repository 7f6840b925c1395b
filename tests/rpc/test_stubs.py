"""Stubs, promises and capabilities through the asyncio driver, over ``memory_pair``.

``caller.main`` is a stub for the ``Service`` that ``callee`` offers; ``callee.main`` is a stub
for whatever the caller offers (``Client``), so calls can go both ways.
"""

from __future__ import annotations

import asyncio
import gc
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from workerloader import DataCloneError, RemoteError, SessionClosed
from workerloader.rpc import RpcPromise, RpcSession, RpcStub, RpcTarget, _wire, memory_pair
from workerloader.rpc._wire import Message, Push, Release, Resolve

HEADER = struct.Struct(">I")
EMPTY = {"exports": 0, "imports": 0, "questions": 0, "answers": 0}

# ---------------------------------------------------------------------------------------------
# Targets


class CustomError(Exception):
    """Not a builtin: crosses as RemoteError."""


class Outer:
    class NestedError(Exception):
        """Its qualified name has a dot."""


class Handle(RpcTarget):
    """A small capability handed out by ``Service``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def ping(self) -> int:
        return self.n


class Table(RpcTarget):
    def __init__(self, name: str) -> None:
        self.name = name

    async def list(self) -> list[dict[str, object]]:
        return [{"table": self.name, "id": 1}, {"table": self.name, "id": 2}]


class Service(RpcTarget):
    """The callee's main capability."""

    limit = 5  # a class attribute that is not a method or property: unreachable

    def __init__(self) -> None:
        self.token = "secret"  # an instance attribute: unreachable
        self.sneaky: Callable[[], str] = lambda: "sneaky"  # unreachable too
        self.received: list[object] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.handles: list[Handle] = []
        self.wait_log: list[str] = []

    # -- reachable ----------------------------------------------------------------------------

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def slow_add(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    @property
    def name(self) -> str:
        return "service"

    @staticmethod
    def version() -> int:
        return 7

    @classmethod
    def kind(cls) -> str:
        return cls.__name__

    def echo(self, *args: object, **kwargs: object) -> object:
        self.received.append(args)
        return args[0] if len(args) == 1 and not kwargs else [list(args), kwargs]

    def table(self, name: str) -> Table:
        return Table(name)

    async def apply(self, fn: RpcStub, x: object) -> object:
        self.received.append(fn)
        return await fn(x)

    def make_adder(self, n: int) -> Callable[[int], int]:
        return lambda x: x + n

    def make_async_adder(self, n: int) -> Callable[[int], Awaitable[int]]:
        async def adder(x: int) -> int:
            await asyncio.sleep(0)
            return x + n

        return adder

    def make_handle(self, n: int = 1) -> Handle:
        handle = Handle(n)
        self.handles.append(handle)
        return handle

    def is_mine(self, value: object) -> bool:
        return any(value is h for h in self.handles)

    def register(self, callback: object, i: int) -> Handle:
        assert isinstance(callback, RpcStub)
        return Handle(i)

    async def call_client(self, x: int) -> object:
        return await self.client.double(x)

    def fail(self, kind: str, message: str) -> None:
        if kind == "ValueError":
            raise ValueError(message)
        if kind == "KeyError":
            raise KeyError(message)
        if kind == "custom":
            raise CustomError(message)
        if kind == "nested":
            raise Outer.NestedError(message)
        raise AssertionError(kind)

    def make_generator(self) -> Iterator[int]:
        yield 1

    def make_unclonable(self) -> object:
        return {"a": [1, object()]}

    async def wait(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.wait_log.append("cancelled")
            raise
        except GeneratorExit:
            self.wait_log.append("closed without CancelledError")
            raise
        return "done"

    def __call__(self) -> str:
        return "called"

    # -- unreachable --------------------------------------------------------------------------

    def _secret(self) -> str:
        return "private"

    def __getattr__(self, name: str) -> object:
        return f"dynamic {name}"

    @property
    def client(self) -> RpcStub:
        assert self._client is not None
        return self._client

    _client: RpcStub | None = None


class Client(RpcTarget):
    """The caller's main capability, reachable from the callee."""

    def double(self, x: int) -> int:
        return 2 * x


# ---------------------------------------------------------------------------------------------
# Helpers


async def settle(rounds: int = 5) -> None:
    """Let the loop deliver queued writes and releases (and collect dropped stubs)."""
    for _ in range(rounds):
        gc.collect()
        await asyncio.sleep(0)


async def close_all(*sessions: RpcSession) -> None:
    for rpc in sessions:
        await rpc.aclose()
    for _ in range(5):
        await asyncio.sleep(0)


@asynccontextmanager
async def pair(
    service: Service | None = None, *, debug: bool = False
) -> AsyncIterator[tuple[RpcSession, RpcSession, Service]]:
    """(caller, callee, service): ``caller.main`` is ``service``; ``callee.main`` a ``Client``."""
    service = service if service is not None else Service()
    caller, callee = await memory_pair(Client(), service, debug=debug)
    service._client = callee.main
    try:
        yield caller, callee, service
    finally:
        service._client = None
        await close_all(caller, callee)


async def raw_call(
    rpc: RpcSession,
    path: list[str | int],
    args: tuple[list[object], dict[str, object]] | None = ([], {}),
    target: int = 0,
) -> object:
    """Send a push the stub API would not build (e.g. a private name) and await its result."""
    question = rpc._session.push(target, path, args, pull=True)
    return await rpc._expect(question)


def split_frames(data: bytes) -> list[Message]:
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        (size,) = HEADER.unpack_from(data, pos)
        assert pos + 4 + size <= len(data), "trailing partial frame"
        out.append(_wire.decode_message(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return out


class WriteLog:
    """Records every ``write`` of a session's transport, decoded into frames."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rpc: RpcSession) -> None:
        transport = rpc._transport
        assert transport is not None
        self.writes: list[list[Message]] = []
        original = transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            self.writes.append(split_frames(bytes(data)))
            original(data)

        monkeypatch.setattr(transport, "write", write)

    @property
    def frames(self) -> list[Message]:
        return [m for w in self.writes for m in w]


def assert_error(exc: BaseException, cls: type[BaseException], *args: object) -> None:
    assert type(exc) is cls, repr(exc)
    assert exc.args == args


# ---------------------------------------------------------------------------------------------
# What a peer can reach


async def test_public_methods_and_properties_are_reachable() -> None:
    async with pair() as (caller, _, _):
        main = caller.main
        assert await main.add(1, 2) == 3
        assert await main.add(1, b=41) == 42
        assert await main.slow_add(2, 3) == 5
        assert await main.name == "service"
        assert await main.version() == 7
        assert await main.kind() == "Service"
        assert await main.echo({"k": (1, 2)}) == {"k": (1, 2)}


@pytest.mark.parametrize(
    "path",
    [["_secret"], ["token"], ["sneaky"], ["limit"], ["__class__"], ["__init__"], ["__dict__"]],
    ids=lambda p: p[0],
)
async def test_private_names_instance_attributes_and_dunders_are_unreachable(
    path: list[str | int],
) -> None:
    async with pair() as (caller, _, _):
        calls: list[tuple[list[object], dict[str, object]] | None] = [([], {}), None]
        for args in calls:
            with pytest.raises(AttributeError) as info:
                await raw_call(caller, path, args)
            assert_error(
                info.value, AttributeError, f"'Service' object has no RPC member {path[0]!r}"
            )
        # A refused name does not end the session.
        assert await caller.main.add(2, 2) == 4
        assert not caller.closed


async def test_getattr_of_the_target_is_not_consulted() -> None:
    async with pair() as (caller, _, service):
        assert service.anything == "dynamic anything"
        with pytest.raises(AttributeError) as info:
            await caller.main.anything
        assert_error(info.value, AttributeError, "'Service' object has no RPC member 'anything'")


async def test_an_int_step_on_a_target_is_refused() -> None:
    async with pair() as (caller, _, _):
        with pytest.raises(AttributeError) as info:
            await raw_call(caller, [0], None)
        assert_error(info.value, AttributeError, "'Service' object has no RPC member 0")


async def test_stubs_refuse_private_names_locally() -> None:
    async with pair() as (caller, _, _):
        with pytest.raises(AttributeError, match=r"^_secret \(names starting with '_' are never"):
            caller.main._secret  # noqa: B018
        with pytest.raises(AttributeError, match=r"^_secret \(names starting with '_' are never"):
            caller.main.table("x")._secret  # noqa: B018


async def test_calling_a_target_itself_is_refused() -> None:
    async with pair() as (caller, _, service):
        assert service() == "called"  # it is callable locally
        with pytest.raises(TypeError) as info:
            await caller.main()
        assert_error(info.value, TypeError, "'Service' object is not callable over RPC")
        handle = await caller.main.make_handle()
        with pytest.raises(TypeError) as info:
            await handle()
        assert_error(info.value, TypeError, "'Handle' object is not callable over RPC")
        handle.dispose()


async def test_results_can_be_walked_along_the_path() -> None:
    async with pair() as (caller, _, _):
        promise = caller.main.echo({"a": [10, (30, 40)]})
        assert await promise.a == [10, (30, 40)]
        # Int steps index lists and tuples (the stub API only builds str steps).
        session = caller._session
        question = session.push(0, ["echo"], ([{"a": [10, (30, 40)]}], {}), pull=False)
        assert await raw_call(caller, ["a", 1, 0], None, target=question) == 30
        with pytest.raises(AttributeError) as info:
            await raw_call(caller, ["a", "x"], None, target=question)
        assert_error(info.value, AttributeError, "'list' object has no RPC member 'x'")
        session.release_question(question)
        del promise
        await settle()
        assert caller.table_sizes() == EMPTY


# ---------------------------------------------------------------------------------------------
# Callbacks


async def test_function_argument_arrives_as_a_stub_the_callee_calls() -> None:
    seen: list[object] = []

    def callback(x: object) -> str:
        seen.append(x)
        return f"cb {x}"

    async with pair() as (caller, callee, service):
        assert await caller.main.apply(callback, 5) == "cb 5"
        assert seen == [5]
        (fn,) = service.received
        assert type(fn) is RpcStub
        assert fn._rpc is callee
        del fn
        service.received.clear()
        await settle()
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY


async def test_coroutine_function_argument_arrives_as_a_stub_the_callee_awaits() -> None:
    async def callback(x: int) -> int:
        await asyncio.sleep(0)
        return x * 10

    async with pair() as (caller, _, _):
        assert await caller.main.apply(callback, 4) == 40
        assert await caller.main.apply(lambda x: [x, x], "y") == ["y", "y"]


async def test_functions_returned_by_the_callee_are_stubs_the_caller_calls() -> None:
    async with pair() as (caller, callee, _):
        add3 = await caller.main.make_adder(3)
        assert type(add3) is RpcStub
        assert await add3(4) == 7
        async_add = await caller.main.make_async_adder(10)
        assert await async_add(5) == 15
        assert callee.table_sizes()["exports"] == 2
        add3.dispose()
        async_add.dispose()
        await settle()
        assert callee.table_sizes() == EMPTY


async def test_callback_that_calls_back_into_the_callee() -> None:
    async def callback(x: int) -> object:
        # Re-entrant: the callee is still evaluating ``apply`` while this runs.
        return await caller.main.add(x, 100)

    async with pair() as (caller, _, _):
        assert await caller.main.apply(callback, 1) == 101


async def test_the_callee_calls_the_callers_main() -> None:
    async with pair() as (caller, _, _):
        assert await caller.main.call_client(21) == 42


async def test_callback_raising_reaches_the_callee_and_back() -> None:
    def callback(x: object) -> None:
        raise ValueError(f"bad {x}")

    async with pair() as (caller, _, _):
        with pytest.raises(ValueError, match=r"^bad 3$") as info:
            await caller.main.apply(callback, 3)
        assert_error(info.value, ValueError, "bad 3")


# ---------------------------------------------------------------------------------------------
# Forwarding and identity


class Sink(RpcTarget):
    """Party C: calls whatever capability it is given."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    async def call_it(self, fn: RpcStub, x: int) -> object:
        self.seen.append(fn)
        return [await fn(x), "via C"]


class Broker(RpcTarget):
    """Party B: hands A's capabilities on to C."""

    def __init__(self, sink: RpcStub) -> None:
        self.sink = sink
        self.seen: list[object] = []

    async def relay(self, fn: RpcStub, x: int) -> object:
        self.seen.append(fn)
        return await self.sink.call_it(fn, x)


async def test_a_stub_is_forwarded_to_a_third_party() -> None:
    sink = Sink()
    b_to_c, c_side = await memory_pair(None, sink)
    broker = Broker(b_to_c.main)
    a_side, b_from_a = await memory_pair(None, broker)
    calls: list[int] = []

    def callback(x: int) -> int:
        calls.append(x)
        return x * 3

    try:
        assert await a_side.main.relay(callback, 7) == [21, "via C"]
        assert calls == [7]
        (at_b,) = broker.seen
        (at_c,) = sink.seen
        assert type(at_b) is RpcStub
        assert at_b._rpc is b_from_a
        assert type(at_c) is RpcStub
        assert at_c._rpc is c_side
        # B exported A's stub to C as one of its own capabilities on the second session.
        assert b_to_c.table_sizes()["exports"] == 1
        assert c_side.table_sizes()["imports"] == 1
        del at_b, at_c
        broker.seen.clear()
        sink.seen.clear()
        await settle(10)
        for rpc in (a_side, b_from_a, c_side):
            assert rpc.table_sizes() == EMPTY, rpc
        assert b_to_c.table_sizes() == EMPTY
    finally:
        await close_all(a_side, b_from_a, b_to_c, c_side)


async def test_a_stub_passed_back_to_its_owner_is_the_original_object() -> None:
    class Local(RpcTarget):
        def hi(self) -> str:
            return "hi"

    def fn() -> None:
        return None

    async with pair() as (caller, callee, service):
        local = Local()
        assert await caller.main.echo(local) is local
        assert await caller.main.echo(fn) is fn
        got = await caller.main.echo([local, {"f": fn}])
        assert got[0] is local
        assert got[1]["f"] is fn
        # And the other way: a stub of the callee's capability sent back arrives as itself.
        handle = await caller.main.make_handle(9)
        assert type(handle) is RpcStub
        assert await caller.main.is_mine(handle) is True
        assert await caller.main.is_mine(Local()) is False
        assert await handle.ping() == 9
        handle.dispose()
        service.received.clear()
        service.handles.clear()
        await settle()
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY


# ---------------------------------------------------------------------------------------------
# Pipelining: one round trip


async def test_pipelined_chain_is_one_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    async with pair() as (caller, callee, _):
        sent = WriteLog(monkeypatch, caller)
        replied = WriteLog(monkeypatch, callee)
        writes_before_reply: list[int] = []

        original = caller.data_received

        def data_received(data: bytes | memoryview) -> None:
            writes_before_reply.append(len(sent.writes))
            original(data)

        monkeypatch.setattr(caller, "data_received", data_received)

        rows = await caller.main.table("users").list()
        assert rows == [{"table": "users", "id": 1}, {"table": "users", "id": 2}]
        # The caller wrote once before anything came back, and the callee replied once, each
        # write starting with its side's Hello (sent with the first message, not on its own).
        assert writes_before_reply[:1] == [1]
        assert isinstance(sent.writes[0][0], _wire.Hello)
        assert isinstance(replied.writes[0][0], _wire.Hello)
        first_write = sent.writes[0][1:]
        assert first_write[:2] == [
            Push(1, 0, ["table"], [["users"], {}], False),
            Push(2, 1, ["list"], [[], {}], True),
        ]
        assert first_write[2:] in ([], [Release(1, 1)])
        assert [w[1:] for w in replied.writes] == [[Resolve(2, rows)]]
        await settle()
        # The intermediate answer was released (in the same write or right after).
        assert sum(isinstance(m, Release) for m in sent.frames) == 1
        assert [m for m in sent.frames if isinstance(m, Push)] == first_write[:2]
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY


async def test_pipelining_on_an_awaited_capability_continues_from_its_value() -> None:
    async with pair() as (caller, _, _):
        table = caller.main.table("t")
        stub = await table
        assert type(stub) is RpcStub
        assert await table.list() == [{"table": "t", "id": 1}, {"table": "t", "id": 2}]
        number = caller.main.add(1, 2)
        assert await number == 3
        with pytest.raises(
            TypeError,
            match=r"^cannot pipeline on a result of type int; only a capability has RPC members$",
        ):
            await number.bit_length()
        stub.dispose()


async def test_a_promise_awaited_twice_sends_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async with pair() as (caller, _, _):
        sent = WriteLog(monkeypatch, caller)
        promise: RpcPromise = caller.main.add(20, 22)
        assert await promise == 42
        assert await promise == 42
        assert [m for m in sent.frames if isinstance(m, Push)] == [
            Push(1, 0, ["add"], [[20, 22], {}], True)
        ]


async def test_a_promise_never_awaited_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async with pair() as (caller, _, _):
        sent = WriteLog(monkeypatch, caller)
        promise = caller.main.table("users").list()
        del promise
        await settle()
        assert sent.writes == []
        assert caller.table_sizes() == EMPTY


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kind", "cls", "args"),
    [
        ("ValueError", ValueError, ("bad",)),
        ("KeyError", KeyError, ("x",)),
    ],
)
async def test_builtin_exceptions_arrive_as_themselves(
    kind: str, cls: type[Exception], args: tuple[object, ...]
) -> None:
    async with pair() as (caller, _, _):
        with pytest.raises(cls) as info:
            await caller.main.fail(kind, args[0])
        assert_error(info.value, cls, *args)
        assert not hasattr(info.value, "__notes__")
        assert await caller.main.add(1, 1) == 2


async def test_key_error_message_matches_the_local_one() -> None:
    async with pair() as (caller, _, _):
        with pytest.raises(KeyError, match=r"^'x'$"):
            await caller.main.fail("KeyError", "x")


@pytest.mark.parametrize(
    ("kind", "remote_type"),
    [
        ("custom", f"{__name__}.CustomError"),
        ("nested", f"{__name__}.Outer.NestedError"),
    ],
)
async def test_custom_exceptions_arrive_as_remote_error(kind: str, remote_type: str) -> None:
    assert remote_type.endswith(("test_stubs.CustomError", "test_stubs.Outer.NestedError"))
    async with pair() as (caller, _, _):
        with pytest.raises(RemoteError) as info:
            await caller.main.fail(kind, "it broke")
        error = info.value
        assert type(error) is RemoteError
        assert error.remote_type == remote_type
        assert error.remote_message == "it broke"
        assert str(error) == f"{remote_type}: it broke"
        assert error.remote_traceback is None


async def test_debug_sessions_send_the_remote_traceback() -> None:
    async with pair(debug=True) as (caller, _, _):
        with pytest.raises(RemoteError) as info:
            await caller.main.fail("custom", "with traceback")
        tb = info.value.remote_traceback
        assert tb is not None
        assert tb.startswith("Traceback (most recent call last):\n")
        assert "in fail\n" in tb
        assert tb.endswith(f"{__name__}.CustomError: with traceback\n")

        # pytest matches the notes too: the message, then the remote traceback note.
        with pytest.raises(ValueError, match=r"^bad value\nremote traceback:\n") as vinfo:
            await caller.main.fail("ValueError", "bad value")
        assert_error(vinfo.value, ValueError, "bad value")
        notes = vinfo.value.__notes__
        assert len(notes) == 1
        assert notes[0].startswith("remote traceback:\nTraceback (most recent call last):\n")
        assert "in fail\n" in notes[0]
        assert notes[0].endswith("ValueError: bad value\n")


async def test_unclonable_argument_raises_locally_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def gen() -> Iterator[int]:
        yield 1

    def fn() -> None:
        return None

    async with pair() as (caller, callee, _):
        sent = WriteLog(monkeypatch, caller)
        g = gen()
        cases: list[tuple[RpcPromise, str]] = [
            (caller.main.echo(g), r"^arguments\[0\]\[0\]: cannot clone a generator object$"),
            (
                caller.main.echo(1, {"k": [fn, g]}),
                r"^arguments\[0\]\[1\]\['k'\]\[1\]: cannot clone a generator object$",
            ),
            (caller.main.echo(x=g), r"^arguments\[1\]\['x'\]: cannot clone a generator object$"),
        ]
        for promise, pattern in cases:
            with pytest.raises(DataCloneError, match=pattern):
                await promise
        await settle()
        assert sent.writes == []
        # The export of ``fn`` taken while encoding was rolled back.
        assert caller.table_sizes() == EMPTY
        # The next call is push 1: no id was used up.
        assert await caller.main.add(1, 2) == 3
        assert isinstance(sent.frames[0], _wire.Hello)  # held until a message went out
        assert sent.frames[1] == Push(1, 0, ["add"], [[1, 2], {}], True)
        assert callee.table_sizes() == EMPTY


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("make_generator", "result: cannot clone a generator object"),
        ("make_unclonable", "result['a'][1]: cannot clone an object object"),
    ],
)
async def test_unclonable_result_arrives_as_data_clone_error(method: str, message: str) -> None:
    async with pair() as (caller, callee, _):
        with pytest.raises(DataCloneError) as info:
            await getattr(caller.main, method)()
        assert type(info.value) is DataCloneError
        assert str(info.value) == message
        assert str(info.value).startswith("result")
        assert await caller.main.add(1, 2) == 3
        assert callee.table_sizes() == EMPTY


# ---------------------------------------------------------------------------------------------
# Release


async def test_tables_do_not_grow_over_ten_thousand_calls() -> None:
    async with pair() as (caller, callee, _):
        peak = {"exports": 0, "imports": 0, "questions": 0, "answers": 0}
        for i in range(10_000):
            handle = await caller.main.register(lambda: None, i)
            assert type(handle) is RpcStub
            del handle
            if i % 500 == 0:
                for rpc in (caller, callee):
                    for table, size in rpc.table_sizes().items():
                        peak[table] = max(peak[table], size)
        assert max(peak.values()) <= 4, peak
        for _ in range(3):
            await settle()
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY
        assert not caller.closed
        assert not callee.closed


async def test_dispose_releases_the_capability() -> None:
    async with pair() as (caller, callee, service):
        handle = await caller.main.make_handle(3)
        assert await handle.ping() == 3
        assert caller.table_sizes()["imports"] == 1
        assert callee.table_sizes()["exports"] == 1
        handle.dispose()
        handle.dispose()  # twice is safe
        await settle()
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY
        with pytest.raises(RuntimeError, match=r"^this stub has been disposed$"):
            await handle.ping()
        with pytest.raises(RuntimeError, match=r"^this stub has been disposed$"):
            handle.dup()
        assert "disposed" in repr(handle)
        assert len(service.handles) == 1


async def test_with_block_releases_the_capability() -> None:
    async with pair() as (caller, callee, _):
        handle = await caller.main.make_handle(4)
        with handle as h:
            assert h is handle
            assert await h.ping() == 4
        await settle()
        assert callee.table_sizes() == EMPTY
        assert caller.table_sizes() == EMPTY
        with pytest.raises(RuntimeError, match=r"^this stub has been disposed$"):
            await handle.ping()


async def test_async_with_block_releases_the_capability() -> None:
    async with pair() as (caller, callee, _):
        handle = await caller.main.make_handle(5)
        async with handle as h:
            assert h is handle
            assert await h.ping() == 5
        await settle()
        assert callee.table_sizes() == EMPTY
        assert caller.table_sizes() == EMPTY


async def test_dup_keeps_the_capability_until_both_are_disposed() -> None:
    async with pair() as (caller, callee, _):
        handle = await caller.main.make_handle(6)
        copy = handle.dup()
        assert copy is not handle
        handle.dispose()
        await settle()
        assert callee.table_sizes()["exports"] == 1
        assert caller.table_sizes()["imports"] == 1
        assert await copy.ping() == 6
        copy.dispose()
        await settle()
        assert callee.table_sizes() == EMPTY
        assert caller.table_sizes() == EMPTY


async def test_a_dropped_stub_is_released_by_gc() -> None:
    async with pair() as (caller, callee, _):
        handle = await caller.main.make_handle(7)
        assert callee.table_sizes()["exports"] == 1
        del handle
        await settle()
        assert callee.table_sizes() == EMPTY
        assert caller.table_sizes() == EMPTY


# ---------------------------------------------------------------------------------------------
# Closing and cancelling


async def test_calls_after_aclose_raise_session_closed() -> None:
    async with pair() as (caller, _, _):
        await caller.aclose()
        await caller.aclose()  # twice is safe
        assert caller.closed
        with pytest.raises(SessionClosed, match=r"^the session was closed$"):
            await caller.main.add(1, 2)


async def _start_waiting(caller: RpcSession, service: Service) -> asyncio.Task[object]:
    """A task awaiting ``caller.main.wait()``, once the callee has started evaluating it."""

    async def call() -> object:
        return await caller.main.wait()

    task = asyncio.create_task(call())
    async with asyncio.timeout(5):
        await service.started.wait()
    return task


async def test_pending_calls_fail_when_the_peer_closes() -> None:
    async with pair() as (caller, callee, service):
        task = await _start_waiting(caller, service)
        for _ in range(3):
            await asyncio.sleep(0)  # the callee's evaluation task is running
        await callee.aclose()
        async with asyncio.timeout(5):
            with pytest.raises(SessionClosed, match=r"^the peer closed the connection$"):
                await task
            reason = await caller.wait_closed()
        assert str(reason) == "the peer closed the connection"
        assert caller.closed
        assert service.wait_log == ["cancelled"]  # the callee's evaluation was cancelled
        with pytest.raises(SessionClosed, match=r"^the peer closed the connection$"):
            await caller.main.add(1, 2)


async def test_closing_right_after_a_call_suspended_cancels_its_evaluation() -> None:
    # The callee closes in the same loop turn in which the call's first step ran and
    # suspended (its task was created but has not run yet). The evaluation must still be
    # cancelled like any other: CancelledError inside it, no "never awaited" coroutine.
    async with pair() as (caller, callee, service):
        task = await _start_waiting(caller, service)
        await callee.aclose()
        async with asyncio.timeout(5):
            with pytest.raises(SessionClosed, match=r"^the peer closed the connection$"):
                await task
        await settle()
        assert service.wait_log == ["cancelled"]


async def test_pending_calls_fail_when_this_side_closes() -> None:
    async with pair() as (caller, _, service):
        task = await _start_waiting(caller, service)
        await caller.aclose()
        async with asyncio.timeout(5):
            with pytest.raises(SessionClosed, match=r"^the session was closed$"):
                await task


async def test_cancelling_an_awaiting_task_does_not_break_the_session() -> None:
    async with pair() as (caller, callee, service):
        task = await _start_waiting(caller, service)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await caller.main.add(1, 2) == 3
        # The cancelled call's answer still arrives and is ignored.
        service.release.set()
        await settle()
        assert await caller.main.slow_add(2, 2) == 4
        assert not caller.closed
        assert not callee.closed
        await settle()
        assert caller.table_sizes() == EMPTY
        assert callee.table_sizes() == EMPTY


async def test_cancelling_before_the_push_is_sent_does_not_break_the_session() -> None:
    async with pair() as (caller, _, _):
        tasks = [asyncio.create_task(_await(caller.main.slow_add(i, i))) for i in range(10)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results[1::2]] == [2 * i for i in range(1, 10, 2)]
        assert all(isinstance(r, asyncio.CancelledError) for r in results[::2])
        assert await caller.main.add(5, 5) == 10


async def _await(promise: RpcPromise) -> Any:
    return await promise


class _Statement(RpcTarget):
    def __init__(self, value: object = None) -> None:
        self.value = value

    def bind(self, value: object) -> _Statement:
        return _Statement(value)


class _Database(RpcTarget):
    def prepare(self) -> _Statement:
        return _Statement()

    async def batch(self, statements: list[_Statement]) -> list[object]:
        return [(type(s).__name__, s.value) for s in statements]


async def test_unawaited_promises_in_arguments_arrive_as_the_callees_own_objects() -> None:
    """Pipelining in arguments (protocol §4, tag 22): the promises are sent unpulled and the
    callee substitutes its own answers, even when the caller releases them right away."""
    client, server = await memory_pair(None, _Database())
    statement = client.main.prepare()
    assert await client.main.batch([statement.bind(1), statement.bind(2)]) == [
        ("_Statement", 1),
        ("_Statement", 2),
    ]
    awaited = client.main.prepare()
    await awaited
    with pytest.raises(DataCloneError, match=r"^an awaited promise cannot be passed on"):
        await client.main.batch([awaited])
    await client.aclose()
    await server.aclose()


class _Sized(RpcTarget):
    @property
    def size(self) -> int:
        return 3


class _Owner(RpcTarget):
    def get(self) -> _Sized:
        return _Sized()


class _Returner(RpcTarget):
    def __init__(self) -> None:
        self.owner: Any = None

    async def sized(self, wait: bool) -> dict[str, object]:
        obj = await self.owner.get()
        return {"size": await obj.size if wait else obj.size}


async def test_returning_an_unawaited_promise_is_a_clone_error_not_a_broken_session() -> None:
    # The promise went out as a reference to an answer, which a result may not carry: the peer
    # ended the session (in a sandboxed worker: WorkerCrashed for a missing `await`).
    returner = _Returner()
    caller, callee = await memory_pair(_Owner(), returner)
    returner.owner = callee.main
    async with caller, callee:
        with pytest.raises(DataCloneError, match="cannot be returned: await it"):
            await caller.main.sized(False)
        assert await caller.main.sized(True) == {"size": 3}  # the session goes on
