"""One thread for the host's slow kernel chores on workers: cgroup moves, kills, closing fds.

These calls block in the kernel (moving a task into a v1 cgroup can wait ~10 ms for an RCU
grace period) or pay for waking another CPU (a SIGKILL to a sleeping worker costs the sender
~0.3 ms on this kind of virtual machine), so they stay off the event loop that serves calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Chores"]

_POLL_S = 0.001
_NAP_AFTER_S = 0.1


class Chores:
    """A thread running submitted jobs in order.

    It polls every millisecond while jobs keep coming and sleeps after 0.1 s without any:
    handing a job to a sleeping thread costs the submitter a wake-up on another CPU (up to a
    millisecond on an idle virtual machine), which at hundreds of workers a second adds up.
    """

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._sleeping = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the thread, after every job submitted before it. A job reports
        through its own state; what it raises is dropped."""
        self._jobs.append(job)
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(
                target=self._run, name="workerloader-chores", daemon=True
            )
            self._thread.start()
        elif self._sleeping:
            self._wake.set()

    def _run(self) -> None:
        busy_at = time.monotonic()
        while True:
            while self._jobs:
                job = self._jobs.popleft()
                with contextlib.suppress(Exception):
                    job()
                busy_at = time.monotonic()
            if self._closing:
                return
            if time.monotonic() - busy_at < _NAP_AFTER_S:
                time.sleep(_POLL_S)
                continue
            self._sleeping = True  # before the check below: see submit
            if not self._jobs and not self._closing:
                self._wake.wait()
            self._wake.clear()
            self._sleeping = False

    def close(self) -> None:
        """Run the jobs still queued, then stop the thread (a later submit starts it again)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
