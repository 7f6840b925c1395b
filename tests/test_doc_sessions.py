"""The console sessions and the config file of README.md and docs/, run as written there: each
command runs for real and answers what the page shows (timings and secrets aside). The Python
samples are run by test_samples.py, README's first curl session by
tests/server/test_readme_session.py. Edit a page's sample and its test here follows it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tests.cli._running import running_cli
from workerloader.cli import main as cli
from workerloader.server._config import load_config

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"duration_ms", "cpu_ms"}


def blocks(page: str, language: str) -> list[str]:
    """The ``language`` code blocks of ``page`` (a path from the repository root)."""
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


def session(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the lines it prints) pairs: ``$ `` starts a command (a
    trailing backslash continues it, a ``# ...`` after it is a comment)."""
    out: list[tuple[str, list[str]]] = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("$ "):
            out.append((line[2:].split("  #")[0].strip(), []))
        elif out:
            out[-1][1].append(line)
    return out


def without_timings(answer: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in answer.items() if k not in TIMINGS}


def run_cli(command: str, *more: str) -> str:
    """``workerloader ...`` as written (plus ``more`` arguments); what it prints (stdout and
    stderr, as a terminal shows them), success or error alike."""
    argv = shlex.split(command)
    assert argv[0] == "workerloader", command
    result = CliRunner().invoke(cli, [*argv[1:], *more])
    return result.output


def test_the_config_file_sample_loads_as_serve_loads_it(tmp_path: Path) -> None:
    (toml,) = blocks("docs/configuration.md", "toml")
    path = tmp_path / "workerloader.toml"
    path.write_text(toml)
    config, host, port = load_config(path, {}, environ={})
    assert (host, port) == ("127.0.0.1", 8787)
    assert config.execute_limits.cpu_ms == 1000
    assert config.api is not None
    assert config.ai is not None
    assert config.ai.model == "gpt-4o-mini"
    # The file is strict: a misspelt option in it would be an error, not a default.
    path.write_text(toml.replace("pool_size", "pool_sise"))
    with pytest.raises(ValueError, match="pool_sise"):
        load_config(path, {}, environ={})


def test_every_command_and_option_of_the_cli_synopsis_exists() -> None:
    synopsis = blocks("docs/cli.md", "console")[0]
    for line in synopsis.splitlines():
        words = line.split("#")[0].split()
        assert words[0] == "workerloader", line
        command = words[1]
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "Usage:" in help_text, line
        for option in re.findall(r"--[a-z-]+", line.split("#")[0]):
            subcommands = re.findall(r"^  ([a-z]+)", help_text, flags=re.M)
            texts = [help_text] + [
                CliRunner().invoke(cli, [command, sub, "--help"]).output for sub in subcommands
            ]
            assert any(option in text for text in texts), (line, option)


WORKER = """from workers import WorkerEntrypoint, Response

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(self.env.GREETING)
"""


def test_the_workers_put_examples_answer_as_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "main.py").write_text(WORKER)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "main.py").write_text("import workers\n\nclass Default(:\n")
    examples = [s for block in blocks("docs/cli.md", "console")[1:] for s in session(block)]
    assert len(examples) == 2
    for command, shown in examples:
        output = run_cli(command, "--data-dir", str(tmp_path / "data"))
        assert output.splitlines() == shown, command


def curl(command: str, address: str, secret: str | None = None) -> dict[str, object]:
    argv = shlex.split(command.replace("localhost:8787", address))
    if secret is not None:
        argv = [arg.replace("wl_...", secret) for arg in argv]
    done = subprocess.run(
        [*argv, "--silent", "--show-error"], capture_output=True, check=True, timeout=60
    )
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_readmes_key_session_answers_as_shown(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text().split("Once a key exists every request needs one")
    steps = session(re.findall(r"```console\n(.*?)```", section[1], flags=re.S)[0])
    (create, printed), (request, answer) = steps
    data = str(tmp_path / "data")
    with running_cli("serve", "--data-dir", data) as served:
        output = run_cli(create, "--data-dir", data)
        assert [line.split(":")[0] for line in output.splitlines()] == [
            line.split(":")[0] for line in printed
        ]
        secret = output.split("secret: ")[1].split()[0]
        address = served.url.removeprefix("http://")
        shown = json.loads(answer[0])
        assert without_timings(curl(request, address, secret)) == without_timings(shown)
        refused = httpx.post(f"{served.url}/execute", json={"code": "return 1"}, timeout=30)
        assert refused.status_code == 401  # the key exists: no more dev mode


def test_the_quickstart_session_is_readmes_and_answers_as_shown(tmp_path: Path) -> None:
    (block,) = blocks("docs/quickstart.md", "console")
    (serve, _), (request, answer) = session(block)
    assert serve == "./scripts/serve"
    assert "./scripts/serve" in (ROOT / "README.md").read_text().split("\n", 5)[3]
    with running_cli("serve", "--data-dir", str(tmp_path / "data")) as served:
        got = curl(request, served.url.removeprefix("http://"))
        assert without_timings(got) == without_timings(json.loads(answer[0]))


def test_trying_a_worker_locally_works_as_readme_shows(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text().split("## Writing a worker, trying it locally")[1]
    block = re.findall(r"```console\n(.*?)```", section, flags=re.S)[0]
    heredoc = re.search(r"cat > site/main.py <<'PY'\n(.*?)\nPY\n", block, flags=re.S)
    assert heredoc is not None
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "main.py").write_text(heredoc.group(1) + "\n")
    commands = [c for c, _ in session(block)]
    assert commands[1] == "workerloader dev site"
    data = str(tmp_path / "data")
    site = str(tmp_path / "site")
    with running_cli("dev", site, "--data-dir", data) as dev:  # it waits on GET /health: hit 1
        first = httpx.get(f"{dev.url}/a", timeout=30)
        second = httpx.get(f"{dev.url}/b", timeout=30)
    assert first.text == f"hello #2 from {dev.url}/a"
    assert second.text == f"hello #3 from {dev.url}/b"
    exec_argv = shlex.split(commands[2])
    done = subprocess.run(
        [sys.executable, "-m", "workerloader.cli", *exec_argv[1:], "--data-dir", data],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '"3"'  # the hits, from the same namespace's KV
