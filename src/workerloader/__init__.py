"""workerloader: run untrusted Python on demand in sandboxed workers that reach the platform
only through capabilities.

The public surface is what this module exports; everything in a ``_module`` is private.
"""

from ._errors import DataCloneError as DataCloneError
from ._errors import FrameTooLarge as FrameTooLarge
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteError as RemoteError
from ._errors import RpcError as RpcError
from ._errors import SessionClosed as SessionClosed
from ._errors import WorkerloaderError as WorkerloaderError
from .rpc import RpcLimits as RpcLimits
from .rpc import RpcStub as RpcStub
from .rpc import RpcTarget as RpcTarget

__version__ = "0.1.0"

__all__ = [
    "DataCloneError",
    "FrameTooLarge",
    "ProtocolError",
    "RemoteError",
    "RpcError",
    "RpcLimits",
    "RpcStub",
    "RpcTarget",
    "SessionClosed",
    "WorkerloaderError",
]
