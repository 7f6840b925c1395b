"""``_prefault``: the zygote learns which of its pages a worker's first call writes, and each
worker copies those pages before it is handed out.

Both halves fork, so each check runs in a fresh Python subprocess that reports what it saw as
JSON on its last line of output.
"""

from __future__ import annotations

from tests._proc import script_json

LEARN = """
import json
import sys

from workerloader.runtime import _main as runtime
from workerloader.sandbox._fork import fork
from workerloader.sandbox._prefault import learn_first_call

runtime.prepare()  # as the zygote does: the runtime imported and warmed up once
runs = learn_first_call(runtime.serve, fork)
regions = []  # (start, end, writable) of the private mappings
with open("/proc/self/maps") as maps:
    for line in maps:
        fields = line.split()
        if fields[1][3] == "p":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end, fields[1][1] == "w"))
inside = all(
    any(lo <= start and start + length <= hi and w == write for lo, hi, w in regions)
    for start, length, write in runs
)
print(json.dumps({
    "written": sum(length for _, length, write in runs if write) // 4096,
    "read": sum(length for _, length, write in runs if not write) // 4096,
    "aligned": all(start % 4096 == 0 and length % 4096 == 0 and length > 0
                   for start, length, _ in runs),
    "inside": inside,
}), file=sys.__stdout__)
"""

FAILED_PROBE = """
import json
import sys

from workerloader.runtime import _main as runtime
from workerloader.sandbox._fork import fork
from workerloader.sandbox._prefault import learn_first_call

runtime.prepare()


def broken_serve(channel, ready):
    channel.close()  # a probe that dies before it serves anything
    return 1


print(json.dumps({"runs": learn_first_call(broken_serve, fork)}), file=sys.__stdout__)
"""

POPULATE = """
import array
import ctypes
import json
import os

from workerloader.sandbox._prefault import populate

PAGES = 64
block = bytearray((PAGES + 1) * 4096)
address = ctypes.addressof(ctypes.c_char.from_buffer(block))
base = (address + 4095) // 4096 * 4096  # the first whole page of the block
for i in range(PAGES):
    block[base - address + i * 4096] = 1  # written here: private to this process


def exclusive(start, count):
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        pagemap.seek(start // 4096 * 8)
        entries = array.array("Q", pagemap.read(count * 8))
    return [bool(e & (1 << 63)) and bool(e & (1 << 56)) for e in entries]


read, write = os.pipe()
pid = os.fork()
if pid == 0:
    before = exclusive(base, PAGES)
    populate([(base + 8 * 4096, 16 * 4096, True)])  # pages 8..23
    after = exclusive(base, PAGES)
    os.write(write, json.dumps({"before": before, "after": after}).encode())
    os._exit(0)
os.close(write)
report = b""
while chunk := os.read(read, 65536):
    report += chunk
os.waitpid(pid, 0)
print(report.decode())
"""


def test_the_probe_reports_whole_pages_of_the_zygotes_mappings_of_the_right_kind() -> None:
    report = script_json(LEARN)
    # A load and a first call copy ~100-200 shared pages (measured: ~105 in the zygote, ~170
    # here) and map some hundreds of code pages; the bounds only say the probe ran and did
    # not report whole mappings.
    assert 20 <= report["written"] <= 1000, report
    assert 20 <= report["read"] <= 5000, report
    assert report["aligned"], report
    assert report["inside"], report  # written pages in writable mappings, read in read-only


def test_a_probe_that_fails_reports_no_pages_and_the_caller_goes_on() -> None:
    assert script_json(FAILED_PROBE) == {"runs": []}


def test_populate_copies_exactly_the_given_pages_into_the_child() -> None:
    report = script_json(POPULATE)
    assert not any(report["before"]), "a fresh child shares all of its parent's pages"
    expected = [8 <= i < 24 for i in range(64)]
    assert report["after"] == expected
