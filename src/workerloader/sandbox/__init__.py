"""The OS sandbox: a clean-exec'd zygote in its own namespaces that forks pre-confined workers.

Each worker is pid 1 of its own PID namespace, with its own uid, a private size-capped tmpfs as
scratch, hard rlimits, no_new_privs, Landlock (read the interpreter, write the scratch, nothing
else) and a libseccomp allow-list (no network, no new processes, no ptrace, mount, unshare, bpf,
io_uring, keyctl). See ``docs/design.md``.
"""

import typing

if typing.TYPE_CHECKING:
    from ._host import Sandbox as Sandbox
    from ._host import WorkerProcess as WorkerProcess
    from ._host import sandbox_support as sandbox_support

__all__ = ["Sandbox", "WorkerProcess", "sandbox_support"]


def __getattr__(name: str) -> typing.Any:
    # Imported on first use: the zygote (``_zygote``) imports this package too, and needs none
    # of the host's side (asyncio's subprocess support, cgroups, threads).
    if name not in __all__:
        raise AttributeError(f"module 'workerloader.sandbox' has no attribute {name!r}")
    from . import _host

    value = getattr(_host, name)
    globals()[name] = value
    return value
