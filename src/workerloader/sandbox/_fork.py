"""Forking workers without CPython's post-fork work, for the single-threaded zygote.

In the child, ``os.fork()`` runs ``PyOS_AfterFork_Child``: it makes new the locks that other
threads might have held at the fork, drops those threads' states, clears the signals caught
but not yet handled, and runs the callbacks that modules registered with
``os.register_at_fork`` (threading, asyncio and logging, in the zygote: they repair thread and
lock state, and asyncio drops a running loop and a signal wake-up descriptor, of which the
zygote has none while it forks). With no other thread there is nothing for most of it to
repair, but it is Python code run in every new worker, and each page it writes is copied:
measured in workers, 141 page faults and 0.62 ms of CPU before ``os.fork()`` had returned,
against 70 and 0.20 ms with ``fork`` here (41 and 0.13 ms of them the bare call). Ten
alternating rounds of a Loader starting workers four at a time: 4.8 against 5.2 ms of zygote
and worker CPU per worker (lower in 8 of 10), 316 against 296 new workers/s (higher in 9).

``fork`` is that direct call (the C library's own fork handlers still run: its allocator
stays consistent), with the rest of what a child needs done by hand: signals are blocked
across the call, so that none is caught in between and handled in both processes (one caught
before runs its handler in the parent first), and a ``random`` module imported before the
fork draws a new seed, or every worker would draw the same numbers. It falls back to
``os.fork()`` while another Python thread runs, and on interpreters other than CPython 3.11
and 3.12, for which this was not checked (3.13 does more around a fork). A thread started
outside Python is not seen: ``single_threaded`` asks the kernel.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stub: signal wraps it)
import _thread
import ctypes
import os
import sys

__all__ = ["fork", "single_threaded"]

_libc = ctypes.PyDLL(None, use_errno=True)  # a PyDLL keeps the GIL held across the call
_libc.fork.argtypes = []
_libc.fork.restype = ctypes.c_int
_ALL_SIGNALS = _signal.valid_signals()
_CHECKED = sys.implementation.name == "cpython" and sys.version_info[:2] in ((3, 11), (3, 12))


def single_threaded() -> bool:
    """Whether this process runs one thread only, C threads included (False if /proc cannot
    tell)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def fork() -> int:
    """fork(2) without CPython's post-fork work (see the module's docstring): 0 in the child,
    the child's pid in the parent. ``os.fork()`` instead while another Python thread runs or
    on an interpreter this was not checked for. Raises OSError."""
    if not _CHECKED or _thread._count():
        return os.fork()
    # The C function, not signal.pthread_sigmask, which makes an enum of every signal in the
    # old mask (~25 page copies in each child). Checking signals as it returns, the first call
    # runs the handler of one caught before.
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        pid: int = _libc.fork()
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
    if pid < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    if pid == 0:
        random = sys.modules.get("random")
        if random is not None:
            random.seed()  # what its at-fork callback does
    return pid
