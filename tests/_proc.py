"""A Python script run in a child process whose output lines a test watches as they come."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


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
