"""Make the zygote's heap immortal before it forks workers (CPython 3.12+, PEP 683).

A forked worker shares the zygote's memory until either writes to a page. CPython writes an
object's reference count whenever code takes or drops a reference to it, so a worker that merely
*runs* the runtime's code copies every page holding an object it touched: several MB per worker.
Since 3.12 an object whose count holds the immortal marker is never written by ``Py_INCREF`` or
``Py_DECREF``; PEP 683 names immortalizing the heap of a pre-fork server as the use case. The
zygote's objects live as long as the zygote anyway, so marking them costs nothing but their
ever being freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import sysconfig

__all__ = ["immortalize_heap"]


def _marker() -> int | None:
    """The reference count this interpreter gives immortal objects, or None where objects are
    not immortal this way (before 3.12, free-threaded builds)."""
    if sys.version_info < (3, 12) or sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    marker = ctypes.c_ssize_t.from_address(id(None)).value  # None is immortal from 3.12 on
    probe = [object()]
    ctypes.c_ssize_t.from_address(id(probe)).value = marker
    before = sys.getrefcount(probe)
    alias = probe  # noqa: F841 - a new reference must leave the count alone
    works = sys.getrefcount(probe) == before
    if not works:  # not the scheme this code knows: undo the mark (two references held here)
        ctypes.c_ssize_t.from_address(id(probe)).value = 2
    return marker if works else None


def immortalize_heap() -> int:
    """Collect garbage, then mark every object reachable from the garbage collector's lists
    immortal; the number marked (0 where this interpreter has no immortal objects). Call once,
    after the last import and before ``gc.freeze()``; objects marked are never freed.

    The mark doubles as the visited set (an object already immortal is skipped with its
    referents), so the walk allocates no per-object bookkeeping: a set of 100,000 ids would
    grow the zygote by megabytes that every fork then copies page tables for.
    """
    gc.collect()  # garbage marked immortal would never be freed
    marker = _marker()
    if marker is None:
        return 0
    marked = 0
    stack = gc.get_objects()
    while stack:
        obj = stack.pop()
        count = ctypes.c_ssize_t.from_address(id(obj))
        if count.value == marker:
            continue
        count.value = marker
        marked += 1
        stack.extend(gc.get_referents(obj))
    del stack
    _libc_malloc_trim()
    return marked


def _libc_malloc_trim() -> None:
    """Give the walk's freed memory back to the system (glibc; elsewhere nothing to do)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
