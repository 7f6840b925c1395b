"""The exception tree of workerloader: one root, split by what the caller should do.

::

    WorkerloaderError                      root: ``except WorkerloaderError`` catches all of ours
    ├── DataCloneError (also TypeError)    fix your code: a value cannot cross to the other side
    ├── RemoteError                        fix your code (or theirs): the far side raised a
    │                                      non-builtin exception; carries its type name
    ├── SandboxUnavailable                 fix the machine: namespaces, seccomp or Landlock
    │                                      missing (or opt into insecure mode)
    └── RpcError                           the session itself is in trouble
        ├── ProtocolError                  the peer broke the protocol; the session is aborted
        ├── SessionClosed                  the session ended (peer gone, aborted, closed);
        │                                  retry on a new session
        └── FrameTooLarge                  a message you tried to send exceeds the frame cap;
                                           send less

Builtin exceptions raised on the far side (``ValueError``, ``KeyError``, …) arrive as themselves,
not as ``RemoteError``; see ``docs/protocol.md`` §6.
"""

from __future__ import annotations

__all__ = [
    "DataCloneError",
    "FrameTooLarge",
    "ProtocolError",
    "RemoteError",
    "RpcError",
    "SandboxUnavailable",
    "SessionClosed",
    "WorkerloaderError",
]


class WorkerloaderError(Exception):
    """Root of every exception workerloader raises on purpose."""


class DataCloneError(WorkerloaderError, TypeError):
    """A value cannot be cloned to the other side.

    The message names where the value sits and what it is, for example
    ``env['CONF']['hook']: cannot clone a generator object``.
    """


class RemoteError(WorkerloaderError):
    """The far side raised an exception that has no local equivalent.

    Attributes:
        remote_type: the qualified name of the remote exception type.
        remote_message: its message.
        remote_traceback: the remote traceback text, only when the far side runs in debug mode.
    """

    def __init__(
        self, remote_type: str, remote_message: str, remote_traceback: str | None = None
    ) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(f"{remote_type}: {remote_message}")


class RpcError(WorkerloaderError):
    """The RPC session failed rather than the call."""


class ProtocolError(RpcError):
    """The peer sent something the protocol forbids; the session has been aborted."""


class SessionClosed(RpcError):
    """The session is closed; calls in flight and new calls fail with this."""


class SandboxUnavailable(WorkerloaderError):
    """This machine cannot run the sandbox (no namespaces, seccomp or Landlock, not root);
    the message says what is missing. Pass ``insecure=True`` only where that is acceptable."""


class FrameTooLarge(RpcError):
    """A message to be sent is larger than ``RpcLimits.max_frame_bytes``; nothing was sent."""
