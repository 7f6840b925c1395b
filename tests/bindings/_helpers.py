"""Shared by the binding tests: an exact-message pattern, and worker-side source for the tests
that run code in the real sandbox."""

import re


def exact(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


DESCRIBE = """
async def describe(awaitable):
    try:
        return ["ok", await awaitable]
    except Exception as exc:
        kind = type(exc)
        return [f"{kind.__module__}.{kind.__qualname__}", isinstance(exc, PermissionError),
                str(exc)]
"""
"""``describe(awaitable)``: ``["ok", value]``, or the type the call raised (module.qualname),
whether it is a PermissionError, and its message."""
