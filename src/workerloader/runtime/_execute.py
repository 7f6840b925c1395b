"""The entrypoint behind ``POST /execute``: call the snippet, return its result as data.

Imported by the zygote, so a worker that runs a snippet compiles only the snippet; the main
module the service sends is a two-line subclass (``Execute`` is not itself an entrypoint of
any module map, since entrypoints are the classes the main module defines).
"""

from __future__ import annotations

import sys
from typing import Any

from ..rpc import RpcLimits, encode_value
from . import workers
from ._modules import BODY_PARAMETERS

__all__ = ["SNIPPET_MODULE", "Execute"]

SNIPPET_MODULE = "execute"
"""The module name of the snippet (a ``{"body": code}`` entry of the module map)."""


class Execute(workers.WorkerEntrypoint):
    async def execute(self) -> Any:
        """Run the snippet's ``main`` with the sdk's bindings; the result must be data."""
        snippet = sys.modules[SNIPPET_MODULE]  # the main module imported it
        sdk = workers.sdk
        bound = sdk._bindings
        result = await snippet.main(self.env, sdk, *(bound.get(n) for n in BODY_PARAMETERS[2:]))
        # The answer becomes JSON: only data may cross, and a clear error says where not.
        encode_value(result, "result", lambda value: None, RpcLimits())
        return result
