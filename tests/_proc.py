"""Child processes in tests: Python scripts run in one (one whose output lines a test watches as
they come, and one that reports what it saw as JSON on its last line), and whether a pid
still names a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any


def _read_lines(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@contextmanager
def script_with_lines(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Run ``python -c script *args``; yield the process and the list its stdout lines are
    appended to as they arrive. On exit the process is killed if it still runs, and its pipes
    are closed."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
        process.stdout.close()
        process.stderr.close()


def script_json(
    script: str,
    *args: str,
    executable: str = sys.executable,
    quiet: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``executable -c script *args`` to its end, with ``env`` added to this process's
    environment; it must exit 0 (and, if ``quiet``, write nothing to stderr). The JSON object
    on its last line of output."""
    done = subprocess.run(
        [executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    if quiet:
        assert done.stderr == ""
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


def pid_exists(pid: int) -> bool:
    """True while ``pid`` names a process (a zombie too, until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
