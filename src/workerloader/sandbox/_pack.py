"""Put the code objects a worker's first call writes to side by side, on as few pages as possible.

CPython (3.11+) specializes bytecode as it runs and keeps counters inside each code object's
bytecode: an instruction that misses its specialization, or has none yet, counts down in place.
So a worker writes to the code objects its calls run through, and the kernel copies every page
holding one of them: ~130 of the ~370 pages a worker copies, each costing it ~4-5 µs and
staying its own. The hot code objects are a few hundred, ~100 KB, but lie scattered among the
zygote's thousands.

The zygote finds them with a probe of a first call (``_probe``): it notes the bytecode of every
code object before the probe is forked, and the probe reports those whose bytecode changed by
the end of its first call.
The zygote then makes fresh copies of them (and of the code objects that hold them as
constants, so that functions made later use the copies), one after another so that they land
together, and points the functions at the copies. The warm-up that follows specializes the
copies as it did the originals.
"""

from __future__ import annotations

import array
import gc
import socket
import types
from collections.abc import Callable

from ._fill import fill_free_blocks
from ._probe import probe_first_call

__all__ = ["pack_hot_code"]

_codes: list[types.CodeType] = []  # every code object the zygote's functions reach, for the probe
_at_start: list[bytes] = []  # their bytecode as the probe was forked


def _changed() -> bytes:
    """In the probe, after its first call: the indexes of the code objects whose bytecode (the
    specialization counters in it) changed, as int64."""
    changed = array.array("q")
    for i, (code, before) in enumerate(zip(_codes, _at_start, strict=True)):
        if code._co_code_adaptive != before:  # type: ignore[attr-defined]
            changed.append(i)
    return changed.tobytes()


def pack_hot_code(
    serve: Callable[[socket.socket, Callable[[], None]], int], fork: Callable[[], int]
) -> int:
    """Copy the code objects a first call writes to side by side and point their functions at
    the copies (see the module docstring); the number of code objects copied (0 if the probe
    failed: nothing changes then). Run in the zygote before its warm-up and before its heap is
    made immortal; ``serve`` is the worker side of a session, forked with ``fork``."""
    global _codes
    functions: dict[int, list[types.FunctionType]] = {}
    parents: dict[int, types.CodeType] = {}
    reached: dict[int, types.CodeType] = {}

    def reach(code: types.CodeType) -> None:
        if id(code) in reached:
            return
        reached[id(code)] = code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                parents[id(const)] = code
                reach(const)

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            functions.setdefault(id(obj.__code__), []).append(obj)
            reach(obj.__code__)
    _codes = list(reached.values())
    # Noted here, so that the probe's own start (its event loop, its session) counts too.
    _at_start[:] = [code._co_code_adaptive for code in _codes]  # type: ignore[attr-defined]
    try:
        data = probe_first_call(serve, lambda: None, _changed, fork)
        hot = [_codes[i] for i in array.array("q", data[: len(data) // 8 * 8])]
    finally:
        _codes = []
        _at_start.clear()
    # A code object made by a function as it runs (a nested def, a lambda) comes from its
    # parent's constants: the parent is copied too, holding the copy.
    wanted = {id(code) for code in hot}
    for code in hot:
        parent = parents.get(id(code))
        while parent is not None and id(parent) not in wanted:
            wanted.add(id(parent))
            parent = parents.get(id(parent))
    copies: dict[int, types.CodeType] = {}
    # Copies made in the free blocks the probe's run left would land among the zygote's other
    # objects again: glibc's best fit put the larger ones (46, ~47 KB) on 47 pages spread
    # over ~260 (measured when the smaller ones came from pymalloc). Taken first, they come
    # from the top of the heap, one after another: on 24 pages.
    fill_free_blocks()

    def copy(code: types.CodeType) -> types.CodeType:
        if id(code) not in copies:
            consts = tuple(
                copy(const) if isinstance(const, types.CodeType) and id(const) in wanted else const
                for const in code.co_consts
            )
            copies[id(code)] = code.replace(co_consts=consts)
        return copies[id(code)]

    for code_id in wanted:
        copy(reached[code_id])
    for code_id, new in copies.items():
        for function in functions.get(code_id, ()):
            function.__code__ = new
    return len(copies)
