"""``pack_hot_code``: the code objects a first call writes to are replaced, in the functions
that run them, by copies made side by side; the functions behave as before.

It rewrites the functions of the process that calls it, so it runs in a fresh Python subprocess
that reports what it saw as JSON on its last line of output.
"""

from __future__ import annotations

from tests._proc import script_json

SCRIPT = """
import gc
import json
import sys
import types

from workerloader.runtime import _main as runtime
from workerloader.sandbox._fork import fork
from workerloader.sandbox._pack import pack_hot_code

runtime.prepare()
functions = [f for f in gc.get_objects() if isinstance(f, types.FunctionType)]
before = [f.__code__ for f in functions]
copied = pack_hot_code(runtime.serve, fork)
replaced = [(old, f.__code__) for f, old in zip(functions, before) if f.__code__ is not old]
runtime.warm_up()  # the same paths run again, through the copies
print(json.dumps({
    "copied": copied,
    "replaced": len(replaced),
    "same_code": all(
        new.co_code == old.co_code
        and new.co_qualname == old.co_qualname
        and new.co_firstlineno == old.co_firstlineno
        and new.co_filename == old.co_filename
        for old, new in replaced
    ),
    "runtime_replaced": any(
        new.co_filename == runtime.__file__ for _, new in replaced
    ),
}), file=sys.__stdout__)
"""

BROKEN = """
import json
import sys

from workerloader.runtime import _main as runtime
from workerloader.rpc import _driver
from workerloader.sandbox._fork import fork
from workerloader.sandbox._pack import pack_hot_code

runtime.prepare()
before = _driver.connect.__code__


def broken_serve(channel, ready):
    channel.close()  # a probe that dies before it serves anything
    return 1


copied = pack_hot_code(broken_serve, fork)
print(json.dumps({"copied": copied, "untouched": _driver.connect.__code__ is before}),
      file=sys.__stdout__)
"""


def test_the_code_a_first_call_runs_is_replaced_by_equal_copies() -> None:
    report = script_json(SCRIPT)
    # A few hundred code objects are written in a first call (measured: ~160 on 3.12, ~70 on
    # 3.11), the worker runtime's among them; each is replaced by an equal copy in the
    # functions that run it.
    assert 20 <= report["copied"] <= 2000, report
    assert report["replaced"] >= 20, report
    assert report["runtime_replaced"], report
    assert report["same_code"], report


def test_nothing_changes_when_the_probe_fails() -> None:
    assert script_json(BROKEN) == {"copied": 0, "untouched": True}
