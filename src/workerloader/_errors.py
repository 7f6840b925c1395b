"""The exception tree of workerloader: one root, split by what the caller should do.

::

    WorkerloaderError                      root: ``except WorkerloaderError`` catches all of ours
    ├── DataCloneError (also TypeError)    fix your code: a value cannot cross to the other side
    ├── RemoteError                        fix your code (or theirs): the far side raised a
    │                                      non-builtin exception; carries its type name
    ├── SandboxUnavailable                 fix the machine: namespaces, seccomp or Landlock
    │                                      missing (or opt into insecure mode)
    ├── PermissionDenied (also             fix the caller's grants: a binding refused an
    │   PermissionError)                   operation its namespace or permissions do not allow
    ├── BindingError                       fix the configuration or the call: a binding could
    │   │                                  not do what was asked (message says why)
    │   └── QuotaExceeded                  delete data: the namespace's store is at its
    │                                      storage quota (the operator sets it)
    ├── WorkerLoadError                    fix the worker's code: bad module map, syntax error,
    │                                      import failure (carries file and line)
    ├── WorkerError                        fix the worker's code: it raised (type, message and
    │                                      a traceback of user frames only)
    ├── WorkerCrashed                      retry: the worker process died; the next call gets
    │                                      a fresh one
    ├── LimitExceeded                      a limit ended the call; the next call gets a fresh
    │   │                                  worker
    │   ├── CpuLimitExceeded
    │   ├── MemoryLimitExceeded
    │   ├── WallTimeExceeded
    │   ├── OutputLimitExceeded
    │   └── SubrequestLimitExceeded
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
    "BindingError",
    "CpuLimitExceeded",
    "DataCloneError",
    "FrameTooLarge",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "OutputLimitExceeded",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteError",
    "RpcError",
    "SandboxUnavailable",
    "SessionClosed",
    "SubrequestLimitExceeded",
    "WallTimeExceeded",
    "WorkerCrashed",
    "WorkerError",
    "WorkerLoadError",
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


class PermissionDenied(WorkerloaderError, PermissionError):
    """A binding refused an operation: the caller's permissions do not include it."""


class BindingError(WorkerloaderError):
    """A binding could not do what was asked (not configured, too large, bad argument)."""


class QuotaExceeded(BindingError):
    """A write would take a namespace's store (its KV, documents, SQL database or blob
    bucket) past the storage quota the host set; nothing of the write was kept. Deleting data
    makes room; writes that do not grow the store still work."""


class WorkerLoadError(WorkerloaderError):
    """The worker's code could not be loaded. ``type_name`` is what failed (``SyntaxError``,
    ``ImportError``, …); ``file`` and ``line`` point into the user's modules when known."""

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        type_name: str = "WorkerLoadError",
    ) -> None:
        self.file = file
        self.line = line
        self.type_name = type_name
        self.message = message
        """What failed, as given ("Type: message"), without where."""
        where = f"{file}:{line}: " if file and line else f"{file}: " if file else ""
        super().__init__(where + message)


class WorkerError(WorkerloaderError):
    """User code raised an exception that is not a builtin; ``type_name``, ``message`` and a
    ``traceback`` of user frames only, with the user's line numbers. ``logs`` has its output."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.logs: list[str] = []
        super().__init__(f"{type_name}: {message}")


class WorkerCrashed(WorkerloaderError):
    """The worker process died during the call (not because of a limit)."""


class LimitExceeded(WorkerloaderError):
    """A limit of the worker ended the call; the worker was killed."""


class CpuLimitExceeded(LimitExceeded):
    """The call used more CPU time than ``Limits.cpu_ms``."""


class MemoryLimitExceeded(LimitExceeded):
    """The worker ran out of its ``Limits.memory_mb``."""


class WallTimeExceeded(LimitExceeded):
    """The call took longer than ``Limits.wall_ms``."""


class OutputLimitExceeded(LimitExceeded):
    """The call wrote more output than ``Limits.output_bytes``."""


class SubrequestLimitExceeded(LimitExceeded):
    """The call made more binding calls to the host than ``Limits.subrequests``."""


class FrameTooLarge(RpcError):
    """A message to be sent is larger than ``RpcLimits.max_frame_bytes``; nothing was sent."""
