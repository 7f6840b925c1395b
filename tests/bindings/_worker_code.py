"""Worker-side source shared by the binding tests that run code in the real sandbox."""

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
