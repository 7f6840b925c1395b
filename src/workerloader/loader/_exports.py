"""Loopback exports (Cloudflare's ``ctx.exports``): host-side entrypoints handed to workers.

``@loader.export`` registers a ``WorkerEntrypoint`` subclass that runs in the host;
``loader.exports.Audit(props={...})`` makes a binding for it. Each call from a worker makes a
new instance with ``self.ctx.props`` set to the props the host bound, which the worker can
neither see nor change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..rpc import RpcTarget
from ..rpc._target import rpc_members
from ..runtime.workers import Context, Env, WorkerEntrypoint

__all__ = ["ExportBinding", "Exports"]

_E = TypeVar("_E", bound=type[WorkerEntrypoint])


class ExportBinding(RpcTarget):
    """A binding for one exported entrypoint class with host-bound props. Its RPC methods are
    exactly the class's public methods (a subclass is made per exported class)."""

    _entrypoint: type[WorkerEntrypoint]

    def __init__(self, props: Mapping[str, object], env: Mapping[str, object]) -> None:
        self._props = dict(props)
        self._env = dict(env)

    def _instance(self) -> Any:
        return self._entrypoint(Context(self._props), Env(self._env))


def _forwarder(name: str) -> Callable[..., Any]:
    async def method(self: ExportBinding, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self._instance(), name)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    method.__name__ = name
    return method


class Exports:
    """``loader.exports``: the registered classes by name, each a factory of bindings."""

    def __init__(self) -> None:
        self._bindings: dict[str, type[ExportBinding]] = {}
        self._envs: dict[str, dict[str, object]] = {}

    def register(self, cls: _E, env: Mapping[str, object] | None = None) -> _E:
        if not (isinstance(cls, type) and issubclass(cls, WorkerEntrypoint)):
            raise TypeError("only WorkerEntrypoint subclasses can be exported")
        names = rpc_members(cls) - rpc_members(WorkerEntrypoint)  # type: ignore[arg-type]
        namespace: dict[str, Any] = {name: _forwarder(name) for name in names}
        namespace["_entrypoint"] = cls
        binding = type(f"{cls.__name__}Binding", (ExportBinding,), namespace)
        self._bindings[cls.__name__] = binding
        self._envs[cls.__name__] = dict(env or {})
        return cls

    def __getattr__(self, name: str) -> Callable[..., ExportBinding]:
        try:
            binding = self._bindings[name]
        except KeyError:
            raise AttributeError(
                f"no export named {name!r}; register it with @loader.export"
            ) from None

        env = self._envs[name]

        def make(props: Mapping[str, object] | None = None) -> ExportBinding:
            return binding(props or {}, env)

        return make
