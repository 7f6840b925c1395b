"""The entrypoint behind ``POST /execute``: call the snippet, return its result as data.

A worker whose main module is a function body (``{"body": code}`` in the module map) gets
``Execute`` as its default entrypoint; the runtime sets ``Execute._body`` to that module when it
loads it. Imported by the zygote, so such a worker compiles only its snippet.
"""

from __future__ import annotations

import types
from typing import Any, ClassVar

from ..rpc import RpcLimits, encode_value
from . import workers
from ._modules import BODY_PARAMETERS

__all__ = ["Execute"]


class Execute(workers.WorkerEntrypoint):
    _body: ClassVar[types.ModuleType | None] = None
    """The loaded function-body module (its ``main`` is the snippet); set once per worker."""

    async def execute(self) -> Any:
        """Run the snippet's ``main`` with the sdk's bindings; the result must be data."""
        if self._body is None:
            raise LookupError("this worker's main module is not a function body")
        sdk = workers.sdk
        bound = sdk._bindings
        result = await self._body.main(self.env, sdk, *(bound.get(n) for n in BODY_PARAMETERS[2:]))
        # The answer becomes JSON: only data may cross, and a clear error says where not.
        encode_value(result, "result", None, RpcLimits())
        return result
