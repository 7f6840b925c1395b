"""Stubs and promises: the caller's view of the peer's capabilities.

An ``RpcStub`` stands for one capability the peer exported. Attribute access and calls on a stub
return ``RpcPromise`` objects without sending anything; a promise is sent when it is awaited or
when another promise is built on it and sent (pipelining), so ``await stub.table("users").list()``
is one round trip.
"""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._driver import RpcSession

__all__ = ["RpcPromise", "RpcStub"]

_UNSET: Any = object()


def _private_name(name: str) -> str:
    # Python's own lookups (__await__, __aenter__, _repr_html_, ...) land here too: the message
    # must stay short, and still say why a user's call of a private method fails.
    return f"{name} (names starting with '_' are never reachable over RPC)"


class RpcStub:
    """A reference to a capability on the other side of a session.

    ``stub.name`` and ``stub.name(...)`` return promises; ``stub(...)`` calls a function
    capability. Dispose a stub when done (``dispose()``, ``with``/``async with``); one that is
    garbage-collected is disposed then. Pass a stub in arguments or results to hand the
    capability on. ``dispose`` and ``dup`` are the stub's own methods, not remote ones.
    """

    __slots__ = ("__weakref__", "_disposed", "_import_id", "_rpc")

    def __init__(self, rpc: RpcSession, import_id: int) -> None:
        self._rpc = rpc
        self._import_id = import_id
        self._disposed = False

    def __getattr__(self, name: str) -> RpcPromise:
        if name.startswith("_"):
            raise AttributeError(_private_name(name))
        return RpcPromise(self._rpc, self, [name], None)

    def __call__(self, *args: object, **kwargs: object) -> RpcPromise:
        return RpcPromise(self._rpc, self, [], (list(args), kwargs))

    def _target(self) -> int:
        if self._disposed:
            raise RuntimeError("this stub has been disposed")
        return self._import_id

    def dup(self) -> RpcStub:
        """Another stub for the same capability, disposed independently."""
        self._target()
        if self._import_id != 0:
            self._rpc._session.retain_import(self._import_id)
        return RpcStub(self._rpc, self._import_id)

    def dispose(self) -> None:
        """Release this stub (safe to call twice). The capability is released on the other side
        when its last local stub is disposed."""
        if self._disposed:
            return
        self._disposed = True
        if self._import_id != 0:
            self._rpc._release_later(self._import_id)

    def __del__(self) -> None:
        self.dispose()

    def __enter__(self) -> RpcStub:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.dispose()

    async def __aenter__(self) -> RpcStub:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.dispose()

    def __repr__(self) -> str:
        state = " disposed" if self._disposed else ""
        return f"<RpcStub {self._import_id}{state}>"


def _mark_retrieved(future: Any) -> None:
    if not future.cancelled():
        future.exception()  # so that asyncio does not log an error nobody awaited


class RpcPromise:
    """The pending result of a call or property read on a stub.

    Await it for the value. Use it like a stub (``promise.name``, ``promise.name(...)``) to
    pipeline: the next call is sent before the first result arrives and names it as its target.
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_future",
        "_parent",
        "_path",
        "_question",
        "_rpc",
        "_value",
    )

    def __init__(
        self,
        rpc: RpcSession,
        parent: RpcStub | RpcPromise | None,
        path: list[str | int],
        args: tuple[list[object], dict[str, object]] | None,
    ) -> None:
        self._rpc = rpc
        self._parent = parent
        self._path = path
        self._args = args
        self._question: int | None = None
        self._future: Any = None
        self._value: object = _UNSET

    def __getattr__(self, name: str) -> RpcPromise:
        if name.startswith("_"):
            raise AttributeError(_private_name(name))
        if self._args is None and self._question is None:
            return RpcPromise(self._rpc, self._parent, [*self._path, name], None)
        return RpcPromise(self._rpc, self, [name], None)

    def __call__(self, *args: object, **kwargs: object) -> RpcPromise:
        if self._args is None and self._question is None:
            return RpcPromise(self._rpc, self._parent, self._path, (list(args), kwargs))
        return RpcPromise(self._rpc, self, [], (list(args), kwargs))

    def send(self) -> RpcPromise:
        """Send the call now instead of on the first ``await``, and return this promise (await
        it for the result). Calls made after it reach the peer after it, so a setup call and
        the first real one can share a round trip. A promise that depends on another one still
        in flight is sent when awaited, as usual. A sent promise that is never awaited drops its
        result, an error included, as a dropped unsent one would."""
        if self._future is None and self._value is _UNSET and not self._waits_on_parent():
            self._future = self._rpc._expect(self._send(pull=True))
            self._future.add_done_callback(_mark_retrieved)
        return self

    def _waits_on_parent(self) -> bool:
        future = self._parent_future()
        return future is not None and not future.done()

    def _parent_future(self) -> Any:
        """The answer future of the nearest already-sent promise this one is built on."""
        parent = self._parent
        while isinstance(parent, RpcPromise):
            if parent._future is not None:
                return parent._future
            parent = parent._parent
        return None

    def _send(self, *, pull: bool) -> int:
        """Send this push (once) and return its question id; ``pull`` also asks for the result."""
        session = self._rpc._session
        if self._question is not None:
            if pull:
                session.pull(self._question)
            return self._question
        parent = self._parent
        target: int
        if isinstance(parent, RpcStub):
            target = parent._target()
        else:
            assert parent is not None
            target = parent._pipeline_target()
        self._question = session.push(target, self._path, self._args, pull=pull)
        self._parent = None  # so an intermediate promise can be released as soon as possible
        self._args = None
        return self._question

    def _pipeline_target(self) -> int:
        if self._future is not None:
            # Pulled in its push, so the peer releases the answer when it replies: continue from
            # the value instead (``_settle`` has awaited it).
            value = self._future.result()
            if isinstance(value, RpcStub) and value._rpc is self._rpc:
                return value._target()
            raise TypeError(
                f"cannot pipeline on a result of type {type(value).__name__}; "
                "only a capability has RPC members"
            )
        return self._send(pull=False)

    async def _settle(self) -> None:
        """Wait for every already-awaited promise this one is built on."""
        future = self._parent_future()
        if future is not None:
            await future

    def __await__(self) -> Generator[Any, None, Any]:
        if self._value is not _UNSET:
            return self._value
        if self._future is None:
            rpc = self._rpc
            if not rpc._may_send():
                yield from rpc._writable().__await__()
            if isinstance(self._parent, RpcPromise):
                yield from self._settle().__await__()
            if self._future is None:
                self._future = rpc._expect(self._send(pull=True))
        value = yield from self._future.__await__()
        self._value = value
        return value

    def __del__(self) -> None:
        if self._question is not None and self._future is None:
            self._rpc._release_question_later(self._question)

    def __repr__(self) -> str:
        state = "sent" if self._question is not None else "unsent"
        return f"<RpcPromise {state} path={self._path!r}>"
