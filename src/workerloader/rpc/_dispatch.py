"""Evaluating a peer's push against a local target (``docs/protocol.md`` §5).

Dispatch is by explicit allow-list, never by arbitrary ``getattr``: on an ``RpcTarget`` only the
names ``rpc_members`` computed from its class are reachable.
"""

from __future__ import annotations

from ._target import RpcForwarder, RpcTarget, is_local_capability, rpc_members

__all__ = ["evaluate"]


def _step(obj: object, step: str | int, is_stub: type | tuple[type, ...]) -> object:
    if isinstance(obj, RpcForwarder) and type(step) is str and not step.startswith("_"):
        return getattr(obj, step)
    if isinstance(obj, RpcTarget):
        if type(step) is str and step in rpc_members(type(obj)):  # type: ignore[arg-type]
            return getattr(obj, step)
        raise AttributeError(f"{type(obj).__name__!r} object has no RPC member {step!r}")
    if isinstance(obj, is_stub):
        if type(step) is str and not step.startswith("_"):
            return getattr(obj, step)
        raise AttributeError(f"stubs have no RPC member {step!r}")
    if isinstance(obj, dict) and type(step) is str:
        return obj[step]
    if isinstance(obj, (list, tuple)) and type(step) is int:
        return obj[step]
    raise AttributeError(f"{type(obj).__name__!r} object has no RPC member {step!r}")


def evaluate(
    target: object,
    path: list[str | int],
    args: list[object] | None,
    kwargs: dict[str, object],
    is_stub: type | tuple[type, ...],
) -> object:
    """Walk ``path`` from ``target`` and call the result if ``args`` is not None.

    Returns the value or an awaitable for it. Raises what the evaluation raises; ``AttributeError``
    for an unreachable name, ``TypeError`` for calling something that is not a capability.
    """
    obj = target
    for step in path:
        obj = _step(obj, step, is_stub)
    if args is None:
        return obj
    callable_ = isinstance(obj, is_stub) or (
        is_local_capability(obj) and not isinstance(obj, RpcTarget)
    )
    if not callable_:
        raise TypeError(f"{type(obj).__name__!r} object is not callable over RPC")
    return obj(*args, **kwargs)  # type: ignore[operator]
