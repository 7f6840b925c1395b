"""``probe_first_call``: a forked probe serves a session that a second child takes through a
load and a first call; its hooks run there, and what the second one returns comes back. A probe
that hangs is killed and reports nothing.

It forks the process that calls it, so each check runs in a fresh Python subprocess that
reports what it saw as JSON on its last line of output.
"""

from __future__ import annotations

from tests._proc import script_json

REPORTS = """
import json
import os
import sys

from workerloader.runtime import _main as runtime
from workerloader.sandbox._probe import probe_first_call

runtime.prepare()
seen = []


def before():
    seen.append("before")


def after():
    # Runs in the probe, after its first call: the probe's main module is loaded there.
    return json.dumps({"seen": seen, "pid_differs": os.getpid() != PARENT,
                       "main_loaded": "main" in sys.modules}).encode()


PARENT = os.getpid()
answer = probe_first_call(runtime.serve, before, after)
print(json.dumps({"answer": json.loads(answer), "seen_here": seen}), file=sys.__stdout__)
"""

HANGS = """
import json
import sys
import time

from workerloader.runtime import _main as runtime
from workerloader.sandbox import _probe

runtime.prepare()
_probe._TIMEOUT_S = 0.5


def hanging_serve(channel, ready):
    time.sleep(60)
    return 0


started = time.monotonic()
answer = _probe.probe_first_call(hanging_serve, lambda: None, lambda: b"never")
print(json.dumps({"answer": answer.decode(), "seconds": time.monotonic() - started}),
      file=sys.__stdout__)
"""


def test_the_hooks_run_in_the_probe_and_its_report_comes_back() -> None:
    report = script_json(REPORTS)
    assert report["answer"] == {"seen": ["before"], "pid_differs": True, "main_loaded": True}
    assert report["seen_here"] == []  # the hooks ran in the probe, not here


def test_a_probe_that_hangs_is_killed_and_reports_nothing() -> None:
    report = script_json(HANGS)
    assert report["answer"] == ""
    assert report["seconds"] < 10  # the timeout (0.5 s here), not the probe's 60 s
