"""The console sessions and the config file of README.md and docs/, run as written there: each
command runs for real and answers what the page shows (timings, ids and secrets aside). The
Python samples are run by test_samples.py, README's first curl session by
tests/server/test_readme_session.py. Every sample is read out of its page: edit a page's sample
and its test here follows it (or fails)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from tests._net import free_port
from tests.cli._running import running_cli
from workerloader.bindings import AiConfig
from workerloader.cli import main as cli
from workerloader.server._config import load_config

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"duration_ms", "cpu_ms"}


def page(name: str) -> str:
    """The text of ``name``, a path from the repository root."""
    return (ROOT / name).read_text()


def blocks(text: str, language: str) -> list[str]:
    """The ``language`` code blocks of ``text``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def section(name: str, heading: str) -> str:
    """The part of page ``name`` after ``heading`` (which must be in it)."""
    parts = page(name).split(heading, 1)
    assert len(parts) == 2, f"{name} has no {heading!r}"
    return parts[1]


def session(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the lines after it) pairs: ``$ `` starts a command (a
    trailing backslash continues it, a ``  # ...`` after it is a comment)."""
    out: list[tuple[str, list[str]]] = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("$ "):
            out.append((line[2:].split("  #")[0].strip(), []))
        elif out:
            out[-1][1].append(line)
    return out


def without_timings(answer: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in answer.items() if k not in TIMINGS}


def invoke(command: str, *more: str) -> Result:
    """``workerloader ...`` as written (plus ``more`` arguments), in this process."""
    argv = shlex.split(command)
    assert argv[0] == "workerloader", command
    return CliRunner().invoke(cli, [*argv[1:], *more])


def curl(command: str, address: str, secret: str | None = None) -> dict[str, object]:
    """A page's curl command against ``address`` (for its ``localhost:8787``), with
    ``secret`` for its ``wl_...``: the JSON it prints."""
    assert "localhost:8787" in command, command
    argv = shlex.split(command.replace("localhost:8787", address))
    assert argv[0] == "curl", command
    if secret is not None:
        assert "wl_..." in command, command
        argv = [arg.replace("wl_...", secret) for arg in argv]
    done = subprocess.run(
        [*argv, "--silent", "--show-error"], capture_output=True, check=True, timeout=60
    )
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def the_readme_worker(directory: Path) -> str:
    """README's "Writing a worker" session up to its first command run in ``directory`` as
    written (``mkdir site && cat > site/main.py <<'PY' ...``) by bash; the command."""
    block = blocks(section("README.md", "## Writing a worker, trying it locally"), "console")[0]
    command, heredoc = session(block)[0]
    assert command.startswith("mkdir site && cat > site/main.py <<"), command
    script = "\n".join([command, *heredoc]) + "\n"
    subprocess.run(["bash", "-c", script], cwd=directory, check=True, timeout=30)
    assert (directory / "site" / "main.py").is_file()
    return command


# docs/configuration.md


def config_state(path: Path, environ: dict[str, str]) -> tuple[object, ...]:
    """What ``load_config`` makes of ``path`` and ``environ``, as comparable values."""
    config, listen = load_config(path, {}, environ=environ)
    gateway = config.api
    allow = None if gateway is None else (tuple(gateway._allow), gateway._allow_private)
    limits = config.execute_limits
    return (
        listen.host,
        listen.port,
        listen.max_connections,
        config.data_dir,
        config.insecure,
        config.pool_size,
        config.max_concurrent_executions,
        config.log_retention_s,
        config.log_max_bytes,
        config.storage_quota_mb,
        config.require_auth,
        config.sandbox_python,
        config.ai,
        (limits.cpu_ms, limits.memory_mb, limits.wall_ms),
        allow,
    )


def test_the_config_file_sample_loads_as_serve_loads_it(tmp_path: Path) -> None:
    (toml,) = blocks(page("docs/configuration.md"), "toml")
    shown = tomllib.loads(toml)
    path = tmp_path / "workerloader.toml"
    path.write_text(toml)
    config, listen = load_config(path, {}, environ={"OPENAI_API_KEY": "sk-test"})
    server = shown["server"]
    assert (listen.host, listen.port) == (server["host"], server["port"])
    assert listen.max_connections == server["max_connections"]
    assert config.data_dir == Path(server["data_dir"])
    assert config.insecure is server["insecure"]
    assert config.pool_size == server["pool_size"]
    assert config.max_concurrent_executions == server["max_concurrent"]
    assert config.log_retention_s == server["log_retention_days"] * 86400
    assert config.log_max_bytes == server["log_max_mb"] << 20
    assert config.storage_quota_mb == server["storage_quota_mb"]
    assert config.require_auth is server["auth"]
    assert config.sandbox_python is None  # commented out in the sample: the service's own
    # The key comes from the variable the file names, never from the file.
    ai = shown["ai"]
    assert config.ai == AiConfig(base_url=ai["base_url"], model=ai["model"], api_key="sk-test")
    limits = config.execute_limits
    assert (limits.cpu_ms, limits.memory_mb, limits.wall_ms) == (
        shown["limits"]["cpu_ms"],
        shown["limits"]["memory_mb"],
        shown["limits"]["wall_ms"],
    )
    api = shown["bindings"]["api"]
    assert config.api is not None
    for pattern in api["allow"]:
        assert config.api._allowed_host(pattern.replace("*", "www")), pattern
    assert not config.api._allowed_host("example.net")
    assert config.api._allow_private is api["allow_private"]
    # The file is strict: a misspelt option in it would be an error, not a default.
    path.write_text(toml.replace("pool_size", "pool_sise"))
    with pytest.raises(ValueError, match="pool_sise"):
        load_config(path, {}, environ={})


def test_every_option_of_the_config_sample_is_read_from_the_file_and_its_variable(
    tmp_path: Path,
) -> None:
    """Each ``name = value  # WORKERLOADER_X, --flag`` line of the sample: another value in the
    file changes the loaded config, its variable overrides the file, and its flag is one of
    ``serve``'s."""
    (toml,) = blocks(page("docs/configuration.md"), "toml")
    path = tmp_path / "workerloader.toml"
    path.write_text(toml)
    as_written = config_state(path, {})
    serve_help = help_of("serve")
    tried: list[str] = []
    for line in toml.splitlines():
        match = re.match(r"(\w+) = (.*?)\s+#\s*(.*)$", line)
        if match is None:
            continue
        (value,) = tomllib.loads(f"v = {match.group(2)}").values()
        for flag in re.findall(r"--[a-z-]+", match.group(3)):
            assert has_option(serve_help, flag), (line, flag)
        for variable, example in re.findall(r'(WORKERLOADER_\w+)(?:="([^"]*)")?', line):
            if isinstance(value, bool):
                in_file, in_variable = json.dumps(not value), str(not value).lower()
            elif isinstance(value, int | float):
                in_file = in_variable = str(value + 1)
            elif isinstance(value, list):
                assert example, f"{line}: a list variable shows its form"
                in_file, in_variable = json.dumps(example.split(",")), example
            else:
                in_file, in_variable = json.dumps(f"{value}2"), f"{value}2"
            changed = toml.replace(line, f"{match.group(1)} = {in_file}")
            path.write_text(changed)
            assert config_state(path, {}) != as_written, (line, "from the file")
            path.write_text(toml)
            assert config_state(path, {variable: in_variable}) != as_written, (line, variable)
            tried.append(variable)
    written = [line for line in toml.splitlines() if not line.startswith("#")]
    assert sorted(tried) == sorted(set(re.findall(r"WORKERLOADER_\w+", "\n".join(written))))


# docs/cli.md


def help_of(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, (command, result.output)
    return result.output


def subcommands(help_text: str) -> set[str]:
    """The commands a group's ``--help`` lists (none for a command)."""
    listed = help_text.split("\nCommands:\n", 1)
    return set(re.findall(r"^  ([a-z]+)", listed[1], flags=re.M)) if len(listed) == 2 else set()


def arguments(help_text: str) -> list[str]:
    """The arguments of a command's usage line (``Usage: workerloader x [OPTIONS] A B``)."""
    usage = re.search(r"^Usage: .*?\[OPTIONS\](.*)$", help_text, flags=re.M)
    assert usage is not None, help_text
    return usage.group(1).split()


def has_option(help_text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){option}(?![\w-])", help_text) is not None


def test_every_command_and_option_of_the_cli_synopsis_exists() -> None:
    """Each line ``workerloader CMD ...`` of the synopsis: CMD is a command; on a group, each
    ``|`` alternative starts with one of its commands, which takes the options and arguments
    written after it; on a command, each alternative is a form of its arguments. Every
    command and every subcommand is in the synopsis."""
    synopsis = blocks(page("docs/cli.md"), "console")[0]
    commands: set[str] = set()
    for line in synopsis.splitlines():
        usage = line.split("#")[0]
        words = usage.split()
        assert words[:1] == ["workerloader"], line
        command = words[1]
        commands.add(command)
        help_text = help_of(command)
        subs = subcommands(help_text)
        named: set[str] = set()
        for alternative in " ".join(words[2:]).split("|"):
            options = re.findall(r"--[a-z-]+", alternative)
            # What is left without its options and their values: [--x V], --x V, [--x].
            rest = re.sub(r"\[--[a-z-]+(?: [^\]]*)?\]|--[a-z-]+(?: [A-Z]+)?", "", alternative)
            positional = rest.split()
            if subs:
                assert positional, line
                sub, positional = positional[0], positional[1:]
                assert sub in subs, (line, sub)
                named.add(sub)
                sub_help = help_of(command, sub)
            else:
                sub_help = help_text
            for option in options:
                assert has_option(sub_help, option), (line, option)
            assert all(p.isupper() or p == "-" for p in positional), (line, positional)
            assert len(positional) == len(arguments(sub_help)), (line, alternative)
        assert named == subs, (line, subs - named)
    assert commands == subcommands(help_of()), "the synopsis shows every command"


def test_the_workers_put_examples_answer_as_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``workers put counter site`` stores README's site worker (its counter); ``broken/`` is
    a worker whose main.py has a syntax error on line 3."""
    monkeypatch.chdir(tmp_path)
    the_readme_worker(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "main.py").write_text("import workers\n\nclass Default(:\n")
    text = section("docs/cli.md", "## Storing a worker")
    refused = re.search(r"one\s+line\s+on\s+stderr\s+and\s+exit\s+status\s+(\d+)", text)
    assert refused is not None
    examples = [s for block in blocks(text, "console") for s in session(block)]
    assert [command.split()[:3] for command, _ in examples] == [
        ["workerloader", "workers", "put"]
    ] * 2
    (tmp_path / "data").mkdir()  # the service's, which the page's user stores into
    for command, shown in examples:
        result = invoke(command, "--data-dir", str(tmp_path / "data"))
        if shown[0].startswith("Error: "):
            assert result.exit_code == int(refused.group(1)), result.output
            assert (result.stdout, result.stderr.splitlines()) == ("", shown), command
        else:
            assert result.exit_code == 0, result.output
            assert (result.stdout.splitlines(), result.stderr) == (shown, ""), command


# README.md and docs/quickstart.md: the service


def test_readmes_key_session_answers_as_shown(tmp_path: Path) -> None:
    text = section("README.md", "Once a key exists every request needs one")
    (create, printed), (request, answer) = session(blocks(text, "console")[0])
    shown_id = re.search(r"^id:\s+(\S+)$", "\n".join(printed), flags=re.M)
    assert shown_id is not None, printed
    data = str(tmp_path / "data")
    with running_cli("serve", "--data-dir", data) as served:
        address = served.url.removeprefix("http://")
        assert httpx.get(f"{served.url}/health", timeout=30).json()["auth"] == "dev"
        result = invoke(create, "--data-dir", data)
        assert result.exit_code == 0, result.output
        key_id = re.search(r"^id:\s+(\S+)$", result.output, flags=re.M)
        secret = re.search(r"^secret:\s+(\S+)$", result.output, flags=re.M)
        assert key_id is not None, result.output
        assert secret is not None, result.output
        assert secret.group(1).startswith("wl_")
        assert re.fullmatch(r"[0-9a-f]+", key_id.group(1)), key_id.group(1)
        assert len(key_id.group(1)) == len(shown_id.group(1))
        as_shown = result.output.replace(key_id.group(1), shown_id.group(1))
        as_shown = as_shown.replace(secret.group(1), "wl_...")
        assert as_shown.splitlines() == printed
        got = curl(request, address, secret.group(1))
        assert without_timings(got) == without_timings(json.loads(answer[0]))
        # Once a key exists every request needs one.
        anonymous = httpx.post(f"{served.url}/execute", json={"code": "return 1"}, timeout=30)
        assert anonymous.status_code == 401


def test_the_quickstart_session_is_readmes_and_answers_as_shown(tmp_path: Path) -> None:
    (block,) = blocks(page("docs/quickstart.md"), "console")
    (serve, _), (request, answer) = session(block)
    readme = session(blocks(section("README.md", "## The service"), "console")[0])
    # The same service as README's session (tested in tests/server/test_readme_session.py),
    # the same request and the same answer.
    assert f"{serve} &" == readme[0][0]

    def normalized(command: str) -> str:
        argv = shlex.split(command)
        return json.dumps([json.dumps(json.loads(a)) if a.startswith("{") else a for a in argv])

    shown = {normalized(command): lines for command, lines in readme if lines}
    assert shown.get(normalized(request)) == answer, (request, shown)
    # ./scripts/serve is `workerloader serve` on its defaults: 127.0.0.1:8787, in dev mode.
    assert re.search(r'^exec \S*workerloader serve "\$@"$', page("scripts/serve"), flags=re.M)
    comment = re.search(r"http://([\d.]+):(\d+) \(dev mode\)", block)
    assert comment is not None, block
    listen = load_config(None, {}, environ={})[1]
    assert (listen.host, listen.port) == (comment.group(1), int(comment.group(2)))
    with running_cli("serve", "--data-dir", str(tmp_path / "data")) as served:
        assert httpx.get(f"{served.url}/health", timeout=30).json()["auth"] == "dev"
        got = curl(request, served.url.removeprefix("http://"))
        assert without_timings(got) == without_timings(json.loads(answer[0]))


# README.md: trying a worker locally


@dataclass
class Served:
    url: str
    output: list[str] = field(default_factory=list)


@contextmanager
def serving(cwd: Path, argv: list[str], env: dict[str, str]) -> Iterator[Served]:
    """``workerloader argv[1:] --port P`` run in ``cwd`` on a free loopback port P, once the
    port takes connections (not an HTTP request: one would reach the worker); stopped, and its
    output kept, on exit."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "workerloader.cli", *argv[1:], "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    output = process.communicate(timeout=10)[0]
                    raise AssertionError(f"{argv} did not start:\n{output}") from None
                time.sleep(0.05)
        yield served
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
        served.output.extend(output.splitlines())


def test_trying_a_worker_locally_works_as_readme_shows(tmp_path: Path) -> None:
    """The session as a user types it in one directory: no --data-dir (both commands use
    ./.workerloader), no WORKERLOADER_* variable; only the port is ours."""
    text = section("README.md", "## Writing a worker, trying it locally")
    block = blocks(text, "console")[0]
    steps = session(block)
    assert steps[0][0] == the_readme_worker(tmp_path)
    (dev, dev_printed), (exec_, exec_printed) = steps[1:]
    assert (dev_printed, exec_printed) == ([], [])
    # "serves it on :8787"
    port = re.search(r"^\$ workerloader dev .*# serves it on :(\d+)", block, flags=re.M)
    assert port is not None, block
    (dev_port,) = [p for p in cli.commands["dev"].params if "--port" in p.opts]
    assert dev_port.default == int(port.group(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERLOADER_")}
    main_py = tmp_path / "site" / "main.py"
    with serving(tmp_path, shlex.split(dev), env) as served:
        first = httpx.get(f"{served.url}/", timeout=30)
        second = httpx.get(f"{served.url}/about?x=1", timeout=30)
        # The request's URL as the service's fetch proxy names it: after the worker (here
        # its directory), not after the address dev listens on.
        assert (first.status_code, first.text) == (200, "hello #1 from https://site/")
        assert (second.status_code, second.text) == (200, "hello #2 from https://site/about?x=1")
        # "reloads when a file changes"
        main_py.write_text(main_py.read_text().replace('f"hello #', 'f"hi #'))
        third = httpx.get(f"{served.url}/", timeout=30)
        assert (third.status_code, third.text) == (200, "hi #3 from https://site/")
        # In another terminal, while dev serves: the same namespace's KV.
        done = subprocess.run(
            [sys.executable, "-m", "workerloader.cli", *shlex.split(exec_)[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout == '"3"\n'  # the result, as JSON: the hits, a string in KV
    assert (tmp_path / ".workerloader").is_dir()
    loads = [line for line in served.output if line.startswith("[dev] loading")]
    assert loads == ["[dev] loading site (version 1)", "[dev] loading site (version 2)"]
