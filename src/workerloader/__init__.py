"""workerloader: run untrusted Python on demand in sandboxed workers that reach the platform
only through capabilities.

The public surface is what this module exports; everything in a ``_module`` is private.
"""

import importlib
import typing

from ._errors import BindingError as BindingError
from ._errors import CpuLimitExceeded as CpuLimitExceeded
from ._errors import DataCloneError as DataCloneError
from ._errors import FrameTooLarge as FrameTooLarge
from ._errors import LimitExceeded as LimitExceeded
from ._errors import MemoryLimitExceeded as MemoryLimitExceeded
from ._errors import OutputLimitExceeded as OutputLimitExceeded
from ._errors import PermissionDenied as PermissionDenied
from ._errors import ProtocolError as ProtocolError
from ._errors import QuotaExceeded as QuotaExceeded
from ._errors import RemoteError as RemoteError
from ._errors import RpcError as RpcError
from ._errors import SandboxUnavailable as SandboxUnavailable
from ._errors import SessionClosed as SessionClosed
from ._errors import SubrequestLimitExceeded as SubrequestLimitExceeded
from ._errors import WallTimeExceeded as WallTimeExceeded
from ._errors import WorkerCrashed as WorkerCrashed
from ._errors import WorkerError as WorkerError
from ._errors import WorkerloaderError as WorkerloaderError
from ._errors import WorkerLoadError as WorkerLoadError

if typing.TYPE_CHECKING:
    from .bindings import AiConfig as AiConfig
    from .bindings import HttpGateway as HttpGateway
    from .loader import EntrypointStub as EntrypointStub
    from .loader import Limits as Limits
    from .loader import Loader as Loader
    from .loader import Request as Request
    from .loader import Response as Response
    from .loader import WorkerCode as WorkerCode
    from .loader import WorkerStub as WorkerStub
    from .rpc import RpcLimits as RpcLimits
    from .rpc import RpcStub as RpcStub
    from .rpc import RpcTarget as RpcTarget
    from .runtime.workers import WorkerEntrypoint as WorkerEntrypoint

# The rest of the surface is imported on first use: the sandbox's zygote imports this package
# too, and every module it holds is memory that each forked worker maps (see docs/sandbox.md).
_LAZY: dict[str, str] = {
    "AiConfig": ".bindings",
    "HttpGateway": ".bindings",
    "EntrypointStub": ".loader",
    "Limits": ".loader",
    "Loader": ".loader",
    "Request": ".loader",
    "Response": ".loader",
    "WorkerCode": ".loader",
    "WorkerStub": ".loader",
    "RpcLimits": ".rpc",
    "RpcStub": ".rpc",
    "RpcTarget": ".rpc",
    "WorkerEntrypoint": ".runtime.workers",
}


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workerloader' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AiConfig",
    "BindingError",
    "CpuLimitExceeded",
    "DataCloneError",
    "EntrypointStub",
    "FrameTooLarge",
    "HttpGateway",
    "LimitExceeded",
    "Limits",
    "Loader",
    "MemoryLimitExceeded",
    "OutputLimitExceeded",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "Request",
    "Response",
    "RpcError",
    "RpcLimits",
    "RpcStub",
    "RpcTarget",
    "SandboxUnavailable",
    "SessionClosed",
    "SubrequestLimitExceeded",
    "WallTimeExceeded",
    "WorkerCode",
    "WorkerCrashed",
    "WorkerEntrypoint",
    "WorkerError",
    "WorkerLoadError",
    "WorkerStub",
    "WorkerloaderError",
]
