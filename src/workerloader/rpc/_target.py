"""What may cross as a capability, and which of its names a peer may reach (protocol §5)."""

from __future__ import annotations

import functools
import inspect
import types
from typing import Final

__all__ = ["RpcForwarder", "RpcTarget", "is_local_capability", "rpc_members"]


class RpcTarget:
    """Base class for objects that cross to the other side by reference, as a stub.

    The peer can call the public methods and read the public properties that the *class* defines
    (names not starting with ``_``). Instance attributes are never reachable, whatever their name.
    Subclasses need no registration: inheriting is the opt-in.
    """

    __slots__ = ()


class RpcForwarder(RpcTarget):
    """An ``RpcTarget`` that forwards any public name to something that applies its own
    allow-list (another worker's entrypoint, which only answers its class's public methods).

    A peer may reach any name not starting with ``_`` on it: ``getattr`` must return an async
    callable for that name.
    """

    __slots__ = ()


_FUNCTION_TYPES: Final = (types.FunctionType, types.MethodType, types.BuiltinMethodType)


def is_local_capability(value: object) -> bool:
    """True if ``value`` crosses as a capability that this side exports.

    That is an ``RpcTarget`` instance, or a plain function, coroutine function or bound method.
    Classes are not capabilities (calling one would construct arbitrary objects on this side).
    """
    return isinstance(value, RpcTarget) or (
        isinstance(value, _FUNCTION_TYPES) and not isinstance(value, type)
    )


@functools.cache
def rpc_members(cls: type) -> frozenset[str]:
    """The names a peer may reach on instances of ``cls``: its public methods and properties.

    Computed from the class and its bases (never from an instance), once per class.
    """
    names: set[str] = set()
    for name in dir(cls):
        if name.startswith("_"):
            continue
        member = inspect.getattr_static(cls, name)
        if isinstance(member, (staticmethod, classmethod, property)) or inspect.isfunction(member):
            names.add(name)
    return frozenset(names)
