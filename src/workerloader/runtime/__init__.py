"""What runs inside a sandboxed worker: the ``workers`` module user code imports, the module
importer for a worker's module map, and the RPC surface the host drives (``_main``).

Nothing here imports host-side code (loader, bindings, server); only the shared RPC layer.
"""
