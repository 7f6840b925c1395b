"""Every option of every command has an environment variable, shown by --help, and they
take effect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
from click.testing import CliRunner

from workerloader.cli import main as cli
from workerloader.server._store import Caller, ServiceStore


def _options(
    command: click.Command, path: str = "workerloader"
) -> Iterator[tuple[str, click.Option]]:
    """(command path, option) for every option in the tree under ``command``."""
    for param in command.params:
        if isinstance(param, click.Option):
            yield path, param
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}")


def test_every_option_has_an_environment_variable_shown_in_help() -> None:
    meaning: dict[str, set[str]] = {}
    checked = 0
    for path, param in _options(cli):
        # --help is not in params; --version, like it, is an action, not a setting.
        if param.name == "version":
            continue
        assert isinstance(param.envvar, str), f"{path} {param.opts[0]} has no variable"
        assert param.envvar.startswith("WORKERLOADER_"), param.envvar
        assert param.show_envvar, f"{path} {param.opts[0]}: --help hides its variable"
        meaning.setdefault(param.envvar, set()).add(param.opts[0])
        checked += 1
    assert checked >= 30  # the walk reached every noun
    # One variable, one option: a shared variable is the same option everywhere.
    assert {v: o for v, o in meaning.items() if len(o) > 1} == {}
    assert "WORKERLOADER_CONFIG" in meaning


def test_help_shows_the_variables() -> None:
    help_text = " ".join(CliRunner().invoke(cli, ["logs", "tail", "--help"]).output.split())
    assert "env var: WORKERLOADER_LOGS_LIMIT" in help_text
    assert "env var: WORKERLOADER_NAMESPACE" in help_text


def test_logs_tail_takes_namespace_limit_and_follow_from_the_environment(tmp_path: Path) -> None:
    store = ServiceStore(tmp_path)
    for status in (200, 201, 202):
        store.log(Caller(None, "team-a", False), "execute", status, 1.0)
    store.log(Caller(None, "default", False), "execute", 299, 1.0)
    store.flush()
    env = {
        "WORKERLOADER_DATA_DIR": str(tmp_path),
        "WORKERLOADER_NAMESPACE": "team-a",
        "WORKERLOADER_LOGS_LIMIT": "2",
        "WORKERLOADER_LOGS_FOLLOW": "false",  # else this would tail forever
    }
    result = CliRunner().invoke(cli, ["logs", "tail"], env=env)
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.output.splitlines()] == ["201", "202"]


def test_serve_reads_the_config_file_workerloader_config_names(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("[server]\nnot_an_option = 1\n")
    result = CliRunner().invoke(cli, ["serve"], env={"WORKERLOADER_CONFIG": str(config)})
    assert result.exit_code == 1
    assert f"{config}: unknown [server] options ['not_an_option']" in result.stderr


def test_keys_create_takes_its_own_variables(tmp_path: Path) -> None:
    env = {
        "WORKERLOADER_KEYS_USER": "ada",
        "WORKERLOADER_KEYS_NAMESPACE": "team-a",
        "WORKERLOADER_KEYS_READ_ONLY": "1",
        # The namespace the CLI acts in is not the one a new key is granted.
        "WORKERLOADER_NAMESPACE": "team-b",
    }
    result = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    [key] = ServiceStore(tmp_path).list_keys()
    assert (key.user_id, key.namespace, key.permissions) == ("ada", "team-a", ("read",))
