"""``immortalize_heap``: the zygote's objects stop being written by reference counting.

It marks the whole heap of the process that calls it, so every check runs in a fresh Python
subprocess that reports what it saw as JSON on its last line of output.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

import workerloader.sandbox._immortal as immortal_module
from tests._proc import script_json

IMMORTAL = sys.version_info >= (3, 12) and not sysconfig.get_config_var("Py_GIL_DISABLED")
"""Whether this interpreter has immortal objects the walk knows how to make."""

SCRIPT = """
import gc
import json
import sys
import weakref

from workerloader.sandbox._immortal import immortalize_heap


class Box:
    pass


OLD_LIST = [object() for _ in range(3)]
OLD_TEXT = "".join(["made-at-run-time-", str(len(OLD_LIST))])  # not interned, not constant
OLD_BOX = Box()
report = {}

old_before = [sys.getrefcount(OLD_LIST), sys.getrefcount(OLD_TEXT), sys.getrefcount(OLD_BOX)]
first = immortalize_heap()
report["first"] = first
report["old_before"] = old_before
report["old_marked"] = [sys.getrefcount(OLD_LIST), sys.getrefcount(OLD_TEXT),
                        sys.getrefcount(OLD_BOX)]
aliases = [OLD_LIST, OLD_TEXT, OLD_BOX] * 100  # 100 new references to each
report["old_with_aliases"] = [sys.getrefcount(OLD_LIST), sys.getrefcount(OLD_TEXT),
                              sys.getrefcount(OLD_BOX)]
del aliases
report["old_after_del"] = [sys.getrefcount(OLD_LIST), sys.getrefcount(OLD_TEXT),
                           sys.getrefcount(OLD_BOX)]
report["none"] = sys.getrefcount(None)

# A second call straight away: everything it can reach was marked by the first.
report["second"] = immortalize_heap()

# Objects made after the calls are ordinary objects.
new_list = [object()]
new_alone = sys.getrefcount(new_list)
alias = new_list
new_aliased = sys.getrefcount(new_list)
del alias
report["new"] = [new_alone, new_aliased, sys.getrefcount(new_list)]
box = Box()  # an instance of a class that is immortal now
box_ref = weakref.ref(box)
del box
report["new_box_freed"] = box_ref() is None
cycle = [Box()]
cycle.append(cycle)
cycle_ref = weakref.ref(cycle[0])
del cycle
report["collected"] = gc.collect()
report["new_cycle_freed"] = cycle_ref() is None

# The process keeps working: imports, the collector, freeing what was marked (a no-op).
import decimal
import fractions
report["decimal"] = str(decimal.Decimal(1) / decimal.Decimal(8))
report["fraction"] = str(fractions.Fraction(3, 6))
del OLD_LIST, OLD_TEXT, OLD_BOX
gc.collect()
gc.freeze()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return script_json(SCRIPT, quiet=True)


def test_the_process_keeps_working_after_the_walk(report: dict[str, Any]) -> None:
    assert isinstance(report["first"], int)
    assert (report["first"] > 0) is IMMORTAL
    assert report["decimal"] == "0.125"
    assert report["fraction"] == "1/2"
    assert report["new_box_freed"] is True
    assert report["new_cycle_freed"] is True
    assert report["collected"] >= 2  # the cycle's list and its Box


@pytest.mark.skipif(not IMMORTAL, reason="immortal objects need CPython 3.12+ with the GIL")
def test_objects_from_before_the_call_no_longer_count_references(
    report: dict[str, Any],
) -> None:
    assert report["first"] > 1000  # the interpreter and workerloader's imports at least
    marker = report["none"]  # None is immortal: what a marked object's count reads
    assert report["old_before"] != [marker] * 3
    assert report["old_marked"] == [marker] * 3
    assert report["old_with_aliases"] == [marker] * 3
    assert report["old_after_del"] == [marker] * 3


@pytest.mark.skipif(not IMMORTAL, reason="immortal objects need CPython 3.12+ with the GIL")
def test_a_second_call_marks_almost_nothing(report: dict[str, Any]) -> None:
    assert report["first"] > 1000
    assert report["second"] * 1000 <= report["first"], report


@pytest.mark.skipif(not IMMORTAL, reason="immortal objects need CPython 3.12+ with the GIL")
def test_objects_made_after_the_call_stay_mortal(report: dict[str, Any]) -> None:
    alone, aliased, after_del = report["new"]
    assert aliased == alone + 1
    assert after_del == alone
    assert alone < 100


@pytest.mark.skipif(IMMORTAL, reason="this interpreter has immortal objects")
def test_nothing_is_marked_without_immortal_objects(report: dict[str, Any]) -> None:
    assert report["first"] == 0
    assert report["second"] == 0
    before = report["old_before"]
    assert report["old_marked"] == before
    assert report["old_with_aliases"] == [count + 100 for count in before]
    assert report["old_after_del"] == before


OLD_PYTHON_SCRIPT = """
import importlib.util
import json
import sys

spec = importlib.util.spec_from_file_location("_immortal", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
old = [object()]
before = sys.getrefcount(old)
marked = module.immortalize_heap()
alias = old
print(json.dumps({"marked": marked, "counts": [before, sys.getrefcount(old)]}))
"""

OLD_PYTHON = shutil.which("python3.11")


@pytest.mark.skipif(OLD_PYTHON is None, reason="no python3.11 on this machine")
def test_python_3_11_marks_nothing() -> None:
    """The module itself (stdlib only) under an interpreter without immortal objects."""
    assert OLD_PYTHON is not None
    source = immortal_module.__file__
    assert source is not None
    report = script_json(OLD_PYTHON_SCRIPT, str(Path(source)), executable=OLD_PYTHON, quiet=True)
    assert report["marked"] == 0
    before, aliased = report["counts"]
    assert aliased == before + 1
