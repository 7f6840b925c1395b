"""Config precedence: flag over environment over file over default; the AI key never in the
file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from workerloader.server._config import load_config


def test_defaults() -> None:
    config, host, port = load_config(None, {}, environ={})
    assert (host, port) == ("127.0.0.1", 8787)
    assert config.data_dir == Path(".workerloader")
    assert config.insecure is False
    assert config.ai is None


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "workerloader.toml"
    file.write_text(
        '[server]\nport = 9000\nhost = "127.0.0.2"\npool_size = 3\ninsecure = true\n'
        '[ai]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "m"\napi_key_env = "MY_KEY"\n'
    )
    env = {"WORKERLOADER_PORT": "9100", "WORKERLOADER_INSECURE": "no", "MY_KEY": "sk-1"}
    config, host, port = load_config(file, {"port": 9200, "host": None}, environ=env)
    assert (host, port) == ("127.0.0.2", 9200)  # file host; flag port over env over file
    assert config.pool_size == 3
    assert config.insecure is False  # env over file
    assert config.ai is not None
    assert config.ai.api_key == "sk-1"  # from the variable the file names


def test_unknown_options_and_bad_values_are_errors(tmp_path: Path) -> None:
    file = tmp_path / "workerloader.toml"
    file.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError, match=r"unknown \[server\] options \['prot'\]"):
        load_config(file, {}, environ={})
    with pytest.raises(ValueError, match=r"^not a boolean: 'maybe'$"):
        load_config(None, {}, environ={"WORKERLOADER_INSECURE": "maybe"})


def test_serve_reports_a_bad_config_clearly(tmp_path: Path) -> None:
    from workerloader.cli import main as cli

    file = tmp_path / "bad.toml"
    file.write_text("[server]\nprot = 1\n")
    result = CliRunner().invoke(cli, ["serve", "--config", str(file)])
    assert result.exit_code != 0
    assert "unknown [server] options ['prot']" in result.output
