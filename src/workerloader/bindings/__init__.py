"""Host-side bindings: the platform's capabilities a worker reaches through its ``env``.

Every binding is an ``RpcTarget`` living in the host; a worker holds only a stub, and the host
checks the binding's namespace and grants on every call (``PermissionDenied``). Get them from
the Loader: ``loader.kv(namespace)``, ``loader.sql(name)``, ``loader.db(namespace)``,
``loader.blobs(bucket)``, or all of them for ``workers.sdk`` with ``loader.sdk(...)``.
"""

from ._ai import AiBinding as AiBinding
from ._ai import AiConfig as AiConfig
from ._blobs import BlobBucket as BlobBucket
from ._blobs import BlobObject as BlobObject
from ._docs import Documents as Documents
from ._kv import KvNamespace as KvNamespace
from ._outbound import HttpGateway as HttpGateway
from ._sql import SqlDatabase as SqlDatabase
from ._sql import Statement as Statement

__all__ = [
    "AiBinding",
    "AiConfig",
    "BlobBucket",
    "BlobObject",
    "Documents",
    "HttpGateway",
    "KvNamespace",
    "SqlDatabase",
    "Statement",
]
