"""The Loader: ``get(id, factory)`` → ``WorkerStub``; cache, LRU, idle TTL, evict."""

from ._code import Limits as Limits
from ._code import WorkerCode as WorkerCode
from ._http import Request as Request
from ._http import Response as Response
from ._loader import Loader as Loader
from ._stub import EntrypointStub as EntrypointStub
from ._stub import WorkerStub as WorkerStub

__all__ = ["EntrypointStub", "Limits", "Loader", "Request", "Response", "WorkerCode", "WorkerStub"]
