"""Config precedence: flag over environment over file over default; the AI key never in the
file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.server.conftest import running
from workerloader.bindings import HttpGateway
from workerloader.server import ServerConfig
from workerloader.server._app import ExecuteLimits
from workerloader.server._config import Listen, load_config
from workerloader.server._protocol import MAX_CONNECTIONS


def test_defaults() -> None:
    config, listen = load_config(None, {}, environ={})
    assert (listen.host, listen.port) == ("127.0.0.1", 8787)
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
    config, listen = load_config(file, {"port": 9200, "host": None}, environ=env)
    assert (listen.host, listen.port) == (
        "127.0.0.2",
        9200,
    )  # file host; flag port over env over file
    assert config.pool_size == 3
    assert config.insecure is False  # env over file
    assert config.ai is not None
    assert config.ai.api_key == "sk-1"  # from the variable the file names


def test_unknown_options_and_bad_values_are_errors(tmp_path: Path) -> None:
    file = tmp_path / "workerloader.toml"
    file.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError, match=r"unknown \[server\] options \['prot'\]"):
        load_config(file, {}, environ={})
    with pytest.raises(ValueError, match=r"^WORKERLOADER_INSECURE='maybe': not a boolean$"):
        load_config(None, {}, environ={"WORKERLOADER_INSECURE": "maybe"})
    with pytest.raises(ValueError, match=r"^WORKERLOADER_PORT='abc': not an integer$"):
        load_config(None, {}, environ={"WORKERLOADER_PORT": "abc"})
    with pytest.raises(ValueError, match=r"^WORKERLOADER_LIMITS_CPU_MS='x': Input should be"):
        load_config(None, {}, environ={"WORKERLOADER_LIMITS_CPU_MS": "x"})
    file.write_text('[server]\nport = "abc"\n')
    with pytest.raises(ValueError, match=r"workerloader.toml: \[server\] port: 'abc' is not an"):
        load_config(file, {}, environ={})
    file.write_text("[server\n")
    with pytest.raises(ValueError, match=r"workerloader.toml: not TOML: "):
        load_config(file, {}, environ={})


def test_the_sandbox_interpreter_comes_from_the_file_the_environment_and_the_flag(
    tmp_path: Path,
) -> None:
    assert load_config(None, {}, environ={})[0].sandbox_python is None  # the service's own
    file = tmp_path / "workerloader.toml"
    file.write_text('[server]\nsandbox_python = "/opt/a/python"\n')
    assert load_config(file, {}, environ={})[0].sandbox_python == "/opt/a/python"
    env = {"WORKERLOADER_SANDBOX_PYTHON": "/opt/b/python"}
    assert load_config(file, {}, environ=env)[0].sandbox_python == "/opt/b/python"
    flags = {"sandbox_python": "/opt/c/python"}
    assert load_config(file, flags, environ=env)[0].sandbox_python == "/opt/c/python"


def test_max_connections_comes_from_the_file_the_environment_and_the_flag(
    tmp_path: Path,
) -> None:
    assert load_config(None, {}, environ={})[1] == Listen("127.0.0.1", 8787, 512)
    assert MAX_CONNECTIONS == 512  # the default the docs and --help give
    file = tmp_path / "workerloader.toml"
    file.write_text("[server]\nmax_connections = 100\n")
    assert load_config(file, {}, environ={})[1].max_connections == 100
    env = {"WORKERLOADER_MAX_CONNECTIONS": "200"}
    assert load_config(file, {}, environ=env)[1].max_connections == 200
    flags = {"max_connections": 300}
    assert load_config(file, flags, environ=env)[1].max_connections == 300
    listen = load_config(file, {}, environ=env)[1]
    assert (listen.host, listen.port) == ("127.0.0.1", 8787)


@pytest.mark.parametrize(
    ("file", "environ", "message"),
    [
        (
            "max_connections = 0",
            {},
            r"^max_connections must be at least 1 \(from --max-connections, "
            r"WORKERLOADER_MAX_CONNECTIONS or \[server\] max_connections\): 0$",
        ),
        (
            "",
            {"WORKERLOADER_MAX_CONNECTIONS": "-5"},
            r"^max_connections must be at least 1 .*: -5$",
        ),
        (
            "",
            {"WORKERLOADER_MAX_CONNECTIONS": "many"},
            r"^WORKERLOADER_MAX_CONNECTIONS='many': not an",
        ),
        ("max_connections = 1.5", {}, r"\[server\] max_connections: 1.5 is not an integer$"),
    ],
)
def test_max_connections_below_one_or_not_a_number_is_an_error(
    tmp_path: Path, file: str, environ: dict[str, str], message: str
) -> None:
    path = tmp_path / "workerloader.toml"
    path.write_text(f"[server]\n{file}\n")
    with pytest.raises(ValueError, match=message):
        load_config(path, {}, environ=environ)


def test_serve_refuses_max_connections_below_one() -> None:
    from workerloader.cli import main as cli

    result = CliRunner().invoke(cli, ["serve", "--max-connections", "0"])
    assert result.exit_code == 2
    assert "Invalid value for '--max-connections'" in result.output
    assert "0 is not in the range x>=1." in result.output
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert f"[default: {MAX_CONNECTIONS}]" in " ".join(help_text.split())


def test_the_storage_quota_comes_from_the_file_the_environment_and_the_flag(
    tmp_path: Path,
) -> None:
    assert load_config(None, {}, environ={})[0].storage_quota_mb == 1024
    file = tmp_path / "workerloader.toml"
    file.write_text("[server]\nstorage_quota_mb = 100\n")
    assert load_config(file, {}, environ={})[0].storage_quota_mb == 100
    env = {"WORKERLOADER_STORAGE_QUOTA_MB": "200"}
    assert load_config(file, {}, environ=env)[0].storage_quota_mb == 200
    assert load_config(file, {"storage_quota_mb": 0}, environ=env)[0].storage_quota_mb is None
    file.write_text("[server]\nstorage_quota_mb = -1\n")
    with pytest.raises(ValueError, match=r"^storage_quota_mb must be at least 0 \(0: no quota;"):
        load_config(file, {}, environ={})
    from workerloader.cli import main as cli

    result = CliRunner().invoke(cli, ["serve", "--storage-quota-mb", "-1"])
    assert result.exit_code == 2
    assert "Invalid value for '--storage-quota-mb'" in result.output


async def test_execute_answers_422_quota_exceeded_past_the_storage_quota(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path / "data", pool_size=1, storage_quota_mb=1)
    put = "await kv.put(key, 'x' * 524_288)"  # two do not fit in 1 MiB
    async with running(config) as client:
        first = await client.post("/execute", json={"code": f"key = 'a'\n{put}"})
        assert first.json()["ok"] is True
        refused = await client.post("/execute", json={"code": f"key = 'b'\n{put}"})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["type"] == "QuotaExceeded"
        assert error["message"].startswith("the KV namespace 'default' holds")
        # A delete always goes through, and makes room.
        freed = await client.post(
            "/execute", json={"code": f"await kv.delete('a')\nkey = 'b'\n{put}"}
        )
        assert freed.json()["ok"] is True


def test_serve_reports_a_bad_config_clearly(tmp_path: Path) -> None:
    from workerloader.cli import main as cli

    file = tmp_path / "bad.toml"
    file.write_text("[server]\nprot = 1\n")
    result = CliRunner().invoke(cli, ["serve", "--config", str(file)])
    assert result.exit_code != 0
    assert "unknown [server] options ['prot']" in result.output


def test_limits_and_the_http_gateway_come_from_the_file_and_environment(tmp_path: Path) -> None:
    file = tmp_path / "workerloader.toml"
    file.write_text(
        "[limits]\ncpu_ms = 250\nwall_ms = 9000\n"
        '[bindings.api]\nallow = ["api.example.com", "*.example.org"]\n'
    )
    config, _ = load_config(file, {}, environ={"WORKERLOADER_LIMITS_WALL_MS": "4000"})
    limits = config.execute_limits
    assert (limits.cpu_ms, limits.memory_mb, limits.wall_ms) == (250, 128, 4000)
    assert config.api is not None
    assert config.api._allowed_host("x.example.org")
    assert not config.api._allowed_host("example.net")
    env = {"WORKERLOADER_API_ALLOW": "127.0.0.1, localhost"}
    config, _ = load_config(None, {}, environ=env)
    assert config.api is not None
    assert config.api._allowed_host("localhost")
    assert load_config(None, {}, environ={})[0].api is None  # no gateway unless configured


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limit]\ncpu_ms = 1\n", r"unknown sections \['limit'\]"),
        ("[limits]\ncpu = 1\n", r"unknown \[limits\] options \['cpu'\]"),
        ("[limits]\ncpu_ms = 0\n", r"\.toml: \[limits\] cpu_ms: Input should be greater than"),
        ("[bindings.api]\nallow = 'x'\n", r"^\[bindings.api\] allow: a list of host patterns$"),
        ("[bindings.kv]\n", r"unknown \[bindings\] options \['kv'\]"),
        (
            "[bindings.api]\nallow = ['a.com']\nallow_private = 'false'\n",
            r"^\[bindings.api\] allow_private: true or false",
        ),
        ("[ai]\nkey = 'sk'\n", r"unknown \[ai\] options \['key'\]"),
    ],
)
def test_a_mistake_in_the_file_is_an_error_naming_it(
    tmp_path: Path, text: str, message: str
) -> None:
    file = tmp_path / "workerloader.toml"
    file.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(file, {}, environ={})


async def test_execute_uses_the_configured_limits_and_gateway(tmp_path: Path) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"from": "loopback"}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    config = ServerConfig(
        data_dir=tmp_path / "data",
        pool_size=1,
        execute_limits=ExecuteLimits(cpu_ms=30),
        api=HttpGateway(["127.0.0.1"], allow_private=True),
    )
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end:\n  pass"
    try:
        async with running(config) as client:
            fetched = await client.post(
                "/execute", json={"code": f"return await api.get('http://127.0.0.1:{port}/')"}
            )
            assert fetched.json()["result"] == {"from": "loopback"}
            limited = await client.post("/execute", json={"code": burn})
            assert limited.json()["error"]["type"] == "CpuLimitExceeded"
            allowed = {"code": burn, "limits": {"cpu_ms": 5000}}  # the request's own limit
            assert (await client.post("/execute", json=allowed)).json()["ok"] is True
            with_api = {
                "main_module": "main.py",
                "modules": {"main.py": "async def fetch(request, env, ctx):\n    pass\n"},
                "bindings": {"API": {"type": "api"}},
            }
            assert (await client.put("/workers/w", json=with_api)).status_code == 200
        async with running(ServerConfig(data_dir=tmp_path / "data", pool_size=1)) as client:
            none = await client.post("/execute", json={"code": "return api is None"})
            assert none.json()["result"] is True
            # Stored while the service had a gateway; it has none now: a 422 that says so.
            fetched = await client.get("/workers/w/fetch/")
            assert fetched.status_code == 422
            assert fetched.json()["error"]["type"] == "BadDefinition"
            refused = await client.put("/workers/w2", json=with_api)
            assert refused.status_code == 400
            assert "[bindings.api]" in refused.json()["error"]["message"]
            # So is an AI binding on a service with no AI provider (its calls would all fail).
            with_ai = {**with_api, "bindings": {"AI": {"type": "ai"}}}
            no_ai = await client.put("/workers/w3", json=with_ai)
            assert no_ai.status_code == 400
            assert "[ai] base_url and model" in no_ai.json()["error"]["message"]
    finally:
        upstream.close()
        await upstream.wait_closed()
