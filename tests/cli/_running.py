"""A long-running CLI command (``serve``, ``dev``) as a user runs it: a child process on a
free loopback port, driven over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from tests._net import free_port


@dataclass
class Running:
    """A command serving at ``url``; ``output`` is its stdout and stderr, once it stopped."""

    url: str
    output: str = field(default="")


@contextmanager
def running_cli(*args: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """``workerloader *args --port P`` on a free port P, once it answers HTTP; stopped (and
    its output collected) on exit. Fails with the output if it exits before answering."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "workerloader.cli", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    running = Running(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{running.url}/health", timeout=5)
                break
            except httpx.ConnectError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    output = process.communicate(timeout=10)[0].decode()
                    raise AssertionError(
                        f"workerloader {args[0]} did not start:\n{output}"
                    ) from None
                time.sleep(0.1)
        yield running
    finally:
        process.terminate()
        try:
            running.output = process.communicate(timeout=10)[0].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            running.output = process.communicate()[0].decode()
