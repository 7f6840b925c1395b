"""``exec`` and ``dev`` give workers the AI provider, HTTP gateway and storage quota ``serve``
would have from the same config (``--config``, ./workerloader.toml, ``WORKERLOADER_*``), and
refuse an ``ai`` or ``api`` binding they cannot serve up front; a half-configured ``[ai]`` is an
error naming what is missing. The provider is a small OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tests.cli._running import running_cli
from workerloader.cli import main as cli


class _Provider(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions``: the reply names the model and the last message."""

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["content-length"])))
        text = f"{payload['model']} read {payload['messages'][-1]['content']}"
        body = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {}}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def provider() -> Iterator[str]:
    """The provider's base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


CHAT = 'return (await ai.chat([{"role": "user", "content": "ada"}]))["content"]'


def test_exec_takes_the_ai_provider_from_the_config_file(tmp_path: Path, provider: str) -> None:
    config = tmp_path / "service.toml"
    config.write_text(f'[ai]\nbase_url = "{provider}"\nmodel = "scorer-1"\n')
    data = str(tmp_path / "data")
    result = CliRunner().invoke(cli, ["exec", CHAT, "--data-dir", data, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == "scorer-1 read ada"
    # Without one, the binding says where a provider is configured.
    bare = CliRunner().invoke(cli, ["exec", CHAT, "--data-dir", data])
    assert bare.exit_code == 1
    assert "no AI provider configured: the service takes one from [ai] base_url" in bare.stderr


def test_half_an_ai_section_is_an_error_naming_the_other_half(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["exec", "return 1", "--data-dir", str(tmp_path / "data")],
        env={"WORKERLOADER_AI_MODEL": "scorer-1"},
    )
    assert result.exit_code == 1
    assert "[ai] model is set but base_url is not" in result.output
    assert "WORKERLOADER_AI_BASE_URL" in result.output


WORKER = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        reply = await self.env.AI.chat([{"role": "user", "content": "grace"}])
        return Response(reply["content"])
"""


def test_dev_serves_an_ai_binding_from_the_environment(tmp_path: Path, provider: str) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text(WORKER)
    args = ("dev", str(source), "--data-dir", str(tmp_path / "data"), "--binding", "AI=ai")
    variables = {"WORKERLOADER_AI_BASE_URL": provider, "WORKERLOADER_AI_MODEL": "scorer-2"}
    with running_cli(*args, env=variables) as dev:
        answer = httpx.get(f"{dev.url}/", timeout=30)
        assert (answer.status_code, answer.text) == (200, "scorer-2 read grace")


def test_dev_refuses_a_binding_it_has_nothing_for(tmp_path: Path) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text(WORKER)
    for binding, says in [
        ("AI=ai", "no AI provider is configured"),
        ("API=api", "no HTTP gateway"),
    ]:
        result = CliRunner().invoke(
            cli, ["dev", str(source), "--data-dir", str(tmp_path / "data"), "--binding", binding]
        )
        assert result.exit_code == 2, result.output
        assert f"--binding {binding}: {says}" in result.output


def test_workers_put_stores_an_ai_binding_it_cannot_check(tmp_path: Path) -> None:
    # The CLI cannot know the serving service's config: the binding is stored as given.
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text(WORKER)
    data = tmp_path / "data"
    args = ["workers", "put", "w", str(source), "--binding", "AI=ai", "--data-dir", str(data)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == "stored w version 1\n"
    # Made a data dir that did not exist: said so, as another directory's service won't read it.
    assert f"made {data}, which did not exist" in result.stderr
    again = CliRunner().invoke(cli, args)
    assert (again.stdout, again.stderr) == ("stored w version 2\n", "")


def test_exec_holds_to_the_configured_storage_quota(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text("[server]\nstorage_quota_mb = 1\n")
    data = str(tmp_path / "data")
    put = "await kv.put('{key}', 'x' * 524_288)"  # two do not fit in 1 MiB
    args = ["--data-dir", data, "--config", str(config)]
    assert CliRunner().invoke(cli, ["exec", put.format(key="a"), *args]).exit_code == 0
    refused = CliRunner().invoke(cli, ["exec", put.format(key="b"), *args])
    assert refused.exit_code == 1
    assert "QuotaExceeded" in refused.output
    unlimited = ["--data-dir", data]  # no quota file here: the default, 1024 MB
    assert CliRunner().invoke(cli, ["exec", put.format(key="b"), *unlimited]).exit_code == 0
