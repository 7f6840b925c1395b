"""The CLI nouns, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from click.testing import CliRunner

from tests._net import free_port
from workerloader.cli import main as cli
from workerloader.server._store import Caller, ServiceStore

WORKER = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        print("served", request.url)
        return Response("VERSION " + request.url)
"""


def test_exec_prints_the_result_and_the_logs(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["exec", "print('hi')\nreturn {'sum': 2 + 2}", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == '{"sum": 4}'
    assert "[log] hi" in result.stderr


def test_exec_reads_standard_input_and_fails_with_the_users_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["exec", "-", "--data-dir", str(tmp_path)], input="x = 1\nraise KeyError('k')\n"
    )
    assert result.exit_code == 1
    assert 'File "execute.py", line 2, in main' in result.stderr


def test_exec_takes_cpu_limit_and_namespace(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    spun = CliRunner().invoke(cli, ["exec", "while True:\n    pass", "--cpu-ms", "50", *data])
    assert spun.exit_code == 1
    assert "CpuLimitExceeded: the call used more than 50 ms of CPU" in spun.stderr
    named = CliRunner().invoke(
        cli, ["exec", "return context.namespace", "--namespace", "team-x", *data]
    )
    assert named.stdout.strip().splitlines()[-1] == '"team-x"'


def test_workers_put_list_and_delete(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.py").write_text(WORKER)
    (source / "config.json").write_text('{"a": 1}')
    data = str(tmp_path / "data")
    runner = CliRunner()
    put = runner.invoke(cli, ["workers", "put", "site", str(source), "--data-dir", data])
    assert put.exit_code == 0, put.output
    assert "stored site version 1" in put.output
    stored = ServiceStore(tmp_path / "data").get_worker("default", "site")
    assert stored is not None
    assert stored["modules"]["config.json"] == {"json": {"a": 1}}
    assert "site" in runner.invoke(cli, ["workers", "list", "--data-dir", data]).output
    assert runner.invoke(cli, ["workers", "delete", "site", "--data-dir", data]).exit_code == 0
    assert runner.invoke(cli, ["workers", "delete", "site", "--data-dir", data]).exit_code != 0
    (source / "main.py").write_text("def broken(:\n")
    refused = runner.invoke(cli, ["workers", "put", "site", str(source), "--data-dir", data])
    assert refused.exit_code != 0


def test_logs_tail_prints_the_request_log(tmp_path: Path) -> None:
    store = ServiceStore(tmp_path)
    store.log(Caller(None, "default", False), "execute", 200, 12.5, logs=["hello"])
    store.log(Caller("ada", "default", True), "rpc", 422, 3.0, worker="w", error_type="ValueError")
    store.flush()  # records are written in batches
    result = CliRunner().invoke(cli, ["logs", "tail", "--no-follow", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert " 200 execute 12.5ms" in lines[0]
    assert lines[1] == "    hello"
    assert lines[2].endswith(" 422 rpc w 3.0ms ValueError by ada")  # a key's user


def test_what_workers_wrote_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    # A worker chooses its logs and its exception's type name: escape sequences in them
    # would clear the operator's screen, set its title or clipboard, or forge log lines.
    hostile = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\rok\nforged 200 execute"
    store = ServiceStore(tmp_path)
    store.log(Caller(None, "default", False), "rpc", 422, 1.0, logs=[hostile], error_type=hostile)
    store.flush()
    result = CliRunner().invoke(cli, ["logs", "tail", "--no-follow", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    escaped = "\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\x0dok\\x0aforged 200 execute"
    record, log = result.output.splitlines()  # two lines: nothing forged
    assert record.endswith(f" 422 rpc 1.0ms {escaped}")
    assert log == f"    {escaped}"
    code = "print('\\x1b[2Jhi')\nraise type('Bad\\x1b[31m', (Exception,), {})('\\rmsg')"
    ran = CliRunner().invoke(cli, ["exec", code, "--data-dir", str(tmp_path / "x")])
    assert ran.exit_code == 1
    assert not {"\x1b", "\r"} & set(ran.stderr), repr(ran.stderr)
    assert "[log] \\x1b[2Jhi" in ran.stderr
    assert "\\x1b[31m: \\x0dmsg" in ran.stderr


def test_dev_serves_a_worker_and_reloads_it_on_change(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.py").write_text(WORKER.replace("VERSION", "v1"))
    port = free_port()
    command = [sys.executable, "-m", "workerloader.cli", "dev", str(source), "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data")]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ}
    )
    try:
        url = f"http://127.0.0.1:{port}/hello"
        deadline = time.monotonic() + 20
        while True:
            try:
                first = httpx.get(url, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "dev did not start"
                time.sleep(0.1)
        assert first.text == "v1 https://src/hello"  # named after the directory
        time.sleep(0.05)  # a later mtime, even on coarse clocks
        (source / "main.py").write_text(WORKER.replace("VERSION", "v2"))
        assert httpx.get(url, timeout=5).text == "v2 https://src/hello"
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert "[log] served" in output


def test_an_invalid_namespace_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    for command in (["exec", "return 1"], ["workers", "list"], ["logs", "tail", "--no-follow"]):
        answer = CliRunner().invoke(
            cli, [*command, "--namespace", "bad/ns", "--data-dir", str(tmp_path)]
        )
        assert answer.exit_code == 2, (command, answer.output)
        assert "invalid namespace or name 'bad/ns'" in answer.output


def test_a_data_dir_without_service_data_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    # A mistyped --data-dir (or a command run elsewhere than `serve`) would show nothing and
    # leave a new empty store behind.
    missing = tmp_path / "typo"
    for command in (
        ["logs", "tail", "--no-follow"],
        ["workers", "list"],
        ["workers", "delete", "w"],
        ["keys", "list"],
        ["keys", "revoke", "k"],
    ):
        answer = CliRunner().invoke(cli, [*command, "--data-dir", str(missing)])
        assert answer.exit_code == 2, (command, answer.output)
        assert "holds no service data" in answer.output
    assert not missing.exists()
