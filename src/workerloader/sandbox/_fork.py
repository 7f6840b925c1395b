"""Forking workers without CPython's post-fork work, for the single-threaded zygote.

In the child, ``os.fork()`` runs ``PyOS_AfterFork_Child``: it makes new the locks that other
threads might have held at the fork, drops those threads' states, and runs the callbacks that
modules registered with ``os.register_at_fork`` (threading, asyncio, logging and
concurrent.futures, in the zygote). With no other thread there is nothing for any of it to
repair, but it is Python code run in every new worker, and each page it writes is copied:
measured in workers, 141 page faults and 0.62 ms of CPU before ``os.fork()`` had returned,
against 41 and 0.13 ms with the C library's ``fork`` called directly. Ten alternating rounds
of a Loader starting workers four at a time: 4.4 against 5.2 ms of zygote and worker CPU per
worker (lower in 9 of 10), 352 against 300 new workers/s (higher in 9 of 10).

``fork`` is that direct call (the C library's own fork handlers still run: its allocator
stays consistent). The one callback whose work a worker needs is done by hand: a ``random``
module imported before the fork draws a new seed, or every worker would draw the same
numbers. Only for a process with one thread (``single_threaded``): any other would leave the
child with locks that thread held and Python state that says it still runs.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["fork", "single_threaded"]

_libc = ctypes.PyDLL(None, use_errno=True)  # a PyDLL keeps the GIL held across the call
_libc.fork.argtypes = []
_libc.fork.restype = ctypes.c_int


def single_threaded() -> bool:
    """Whether this process runs one thread only, C threads included (False if /proc cannot
    tell)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def fork() -> int:
    """fork(2) without CPython's post-fork work (see the module's docstring): 0 in the child,
    the child's pid in the parent. For a single-threaded process only. Raises OSError."""
    pid: int = _libc.fork()
    if pid < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    if pid == 0:
        random = sys.modules.get("random")
        if random is not None:
            random.seed()  # what its at-fork callback does
    return pid
