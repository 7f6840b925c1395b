"""The capability RPC layer: structured clone, a sans-IO protocol core and its asyncio driver.

The wire is specified in ``docs/protocol.md``. ``Session`` is the sans-IO core (bytes in, events
and bytes out); ``RpcSession`` drives it over an asyncio transport; ``RpcStub`` and ``RpcPromise``
are what callers hold; ``RpcTarget`` marks local objects that cross by reference.
"""

from .._errors import (
    DataCloneError as DataCloneError,
)
from .._errors import (
    FrameTooLarge as FrameTooLarge,
)
from .._errors import (
    ProtocolError as ProtocolError,
)
from .._errors import (
    RemoteError as RemoteError,
)
from .._errors import (
    SessionClosed as SessionClosed,
)
from ._clone import decode_value as decode_value
from ._clone import encode_value as encode_value
from ._core import Closed as Closed
from ._core import Evaluate as Evaluate
from ._core import Event as Event
from ._core import Raised as Raised
from ._core import Returned as Returned
from ._core import Session as Session
from ._core import StubCodec as StubCodec
from ._driver import RpcSession as RpcSession
from ._driver import connect as connect
from ._driver import memory_pair as memory_pair
from ._limits import RpcLimits as RpcLimits
from ._stubs import RpcPromise as RpcPromise
from ._stubs import RpcStub as RpcStub
from ._target import RpcForwarder as RpcForwarder
from ._target import RpcTarget as RpcTarget
from ._wire import PROTOCOL_VERSION as PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "Closed",
    "DataCloneError",
    "Evaluate",
    "Event",
    "FrameTooLarge",
    "ProtocolError",
    "Raised",
    "RemoteError",
    "Returned",
    "RpcForwarder",
    "RpcLimits",
    "RpcPromise",
    "RpcSession",
    "RpcStub",
    "RpcTarget",
    "Session",
    "SessionClosed",
    "StubCodec",
    "connect",
    "decode_value",
    "encode_value",
    "memory_pair",
]
