"""``pack_hot_code``: the code objects a first call writes to are replaced, in the functions
that run them, by copies made side by side; the functions behave as before.

It rewrites the functions of the process that calls it, so it runs in a fresh Python subprocess
that reports what it saw as JSON on its last line of output.
"""

from __future__ import annotations

from tests._proc import script_json

SCRIPT = """
import asyncio
import json
import sys

from workerloader.rpc import _driver
from workerloader.runtime import _main as runtime
from workerloader.sandbox._pack import pack_hot_code

runtime.prepare()
before = {"connect": _driver.connect.__code__, "serve": runtime.serve.__code__}
copied = pack_hot_code(runtime.serve)
after = {"connect": _driver.connect.__code__, "serve": runtime.serve.__code__}
runtime.warm_up()  # the same paths run again, through the copies
print(json.dumps({
    "copied": copied,
    "replaced": sorted(name for name in before if after[name] is not before[name]),
    "same_code": all(
        after[name].co_code == before[name].co_code
        and after[name].co_qualname == before[name].co_qualname
        and after[name].co_firstlineno == before[name].co_firstlineno
        for name in before
    ),
}), file=sys.__stdout__)
"""

BROKEN = """
import json
import sys

from workerloader.runtime import _main as runtime
from workerloader.rpc import _driver
from workerloader.sandbox._pack import pack_hot_code

runtime.prepare()
before = _driver.connect.__code__


def broken_serve(channel, ready):
    channel.close()  # a probe that dies before it serves anything
    return 1


copied = pack_hot_code(broken_serve)
print(json.dumps({"copied": copied, "untouched": _driver.connect.__code__ is before}),
      file=sys.__stdout__)
"""


def test_the_code_a_first_call_runs_is_replaced_by_equal_copies() -> None:
    report = script_json(SCRIPT)
    # A session's connect and the worker's serve run in every first call; a few hundred
    # code objects are written in all (measured: ~160).
    assert 20 <= report["copied"] <= 2000, report
    assert report["replaced"] == ["connect", "serve"], report
    assert report["same_code"], report


def test_nothing_changes_when_the_probe_fails() -> None:
    assert script_json(BROKEN) == {"copied": 0, "untouched": True}
