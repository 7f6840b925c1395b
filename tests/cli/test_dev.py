"""``workerloader dev`` answers as the service's fetch proxy does: its methods, its statuses
and its JSON error body."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.cli._running import running_cli
from workerloader.server._workers import FETCH_METHODS

WORKER = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        print("got", request.method)
        if request.url.endswith("/fail"):
            raise ValueError("no such page")
        if request.url.endswith("/whole"):  # over what one message carries: streamed
            return Response(bytes(range(256)) * 20_000)
        if request.url.endswith("/broken"):
            async def broken():
                yield b"partial"
                raise KeyError("midway")
            return Response(broken())
        return Response("body", headers={"x-method": request.method})
"""


def test_dev_passes_every_method_and_answers_failures_like_the_service(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.py").write_text(WORKER)
    with running_cli("dev", str(source), "--data-dir", str(tmp_path / "data")) as dev:
        for method in FETCH_METHODS:
            answer = httpx.request(method, f"{dev.url}/page", timeout=30)
            assert answer.status_code == 200, (method, answer.text)
            assert answer.headers["x-method"] == method
            assert answer.text == ("" if method == "HEAD" else "body")

        too_large = httpx.post(f"{dev.url}/page", content=b"x" * ((1 << 20) + 1), timeout=30)
        assert too_large.status_code == 413
        assert too_large.json()["error"]["type"] == "PayloadTooLarge"
        at_the_cap = httpx.post(f"{dev.url}/page", content=b"x" * (1 << 20), timeout=30)
        assert at_the_cap.status_code == 200

        failed = httpx.get(f"{dev.url}/fail", timeout=30)
        assert failed.status_code == 422
        assert failed.json() == {
            "ok": False,
            "error": {
                "type": "ValueError",
                "message": "no such page",
                "traceback": 'Traceback (most recent call last):\n  File "main.py", line 9,'
                " in fetch\nValueError: no such page\n",
            },
            "logs": ["got GET"],
        }

        # Bodies as the service sends them: any size, and one that breaks off is cut short.
        whole = httpx.get(f"{dev.url}/whole", timeout=30)
        assert (whole.status_code, whole.content) == (200, bytes(range(256)) * 20_000)
        with (
            httpx.stream("GET", f"{dev.url}/broken", timeout=30) as cut,
            pytest.raises(httpx.RemoteProtocolError),
        ):
            cut.read()
        assert cut.status_code == 200

        (source / "main.py").write_text("def broken(:\n")
        broken = httpx.get(f"{dev.url}/page", timeout=30)
        assert broken.status_code == 422
        assert broken.json()["error"]["type"] == "SyntaxError"
        assert (broken.json()["error"]["file"], broken.json()["error"]["line"]) == ("main.py", 1)
    assert "[dev] 422 Traceback (most recent call last):" in dev.output
    assert "[dev] 422 main.py:1: SyntaxError: invalid syntax" in dev.output
    assert "[dev] the body broke off: KeyError: midway" in dev.output
    assert "Exception in ASGI application" not in dev.output  # the worker's, not the server's


BOUND = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        count = int(await self.env.KV.get("n") or 0) + 1
        await self.env.KV.put("n", str(count))
        return Response(f"{self.env.GREETING} {count} {self.env.LIMITS['n']}")
"""


def test_dev_gives_the_worker_env_data_and_bindings(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.py").write_text(BOUND)
    options = ["--env", "GREETING=hello", "--env", 'LIMITS={"n": 3}', "--binding", "KV=kv"]
    with running_cli("dev", str(source), *options, "--data-dir", str(tmp_path / "data")) as dev:
        greeting, count, n = httpx.get(f"{dev.url}/", timeout=30).text.split()
        assert (greeting, n) == ("hello", "3")
        # The KV binding keeps the count (dev's start-up check may have made a request too).
        assert httpx.get(f"{dev.url}/", timeout=30).text == f"hello {int(count) + 1} 3"


def test_dev_refuses_a_name_given_as_both_env_and_binding(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workerloader.cli import main as cli

    (tmp_path / "main.py").write_text(BOUND)
    answer = CliRunner().invoke(cli, ["dev", str(tmp_path), "--env", "KV=1", "--binding", "KV=kv"])
    assert answer.exit_code == 2
    assert "KV: given as both --env and --binding" in answer.output
