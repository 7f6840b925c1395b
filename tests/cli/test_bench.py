"""``workerloader bench``: the table on stdout, a status line on stderr only on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from click.testing import CliRunner

from workerloader.cli import main as cli

SMALL = ["bench", "rpc", "--calls", "50", "--pipelined", "500"]


def test_bench_prints_only_its_table_when_stderr_is_not_a_terminal() -> None:
    result = CliRunner().invoke(cli, SMALL)
    assert result.exit_code == 0, result.output
    assert "RPC between two processes" in result.stdout
    assert result.stderr == ""


def test_bench_shows_what_it_measures_on_a_terminal_and_clears_it() -> None:
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workerloader.cli", *SMALL],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env={**os.environ, "TERM": "xterm"},
            timeout=120,
            check=True,
        )
        shown = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert "measuring RPC round trips…" in shown
    assert shown.rindex("\x1b[2K") > shown.rindex("measuring")  # erased once done
    assert "measuring" not in done.stdout.decode()
    assert "RPC between two processes" in done.stdout.decode()
