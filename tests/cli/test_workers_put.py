"""``workers put`` with env data, bindings and limits, called through the service; and its
one-line refusal of a worker that does not load."""

from __future__ import annotations

from pathlib import Path

import httpx
from click.testing import CliRunner

from tests.cli._running import running_cli
from workerloader.cli import main as cli
from workerloader.server._store import ServiceStore

# README's worker: it reaches KV through the sdk, which only a SDK binding gives it.
COUNTER = """
from workers import WorkerEntrypoint, Response, sdk

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        hits = int(await sdk.kv.get("hits") or 0) + 1
        await sdk.kv.put("hits", str(hits))
        return Response(f"{self.env.GREETING} #{hits} of {self.env.LIMIT['max']} {request.url}")
"""


def test_a_worker_put_with_an_sdk_binding_uses_kv_when_called(tmp_path: Path) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text(COUNTER)
    data = str(tmp_path / "data")
    runner = CliRunner()
    put = ["workers", "put", "counter", str(source), "--data-dir", data]
    put += ["--binding", "SDK=sdk", "--binding", "NOTES=kv:ro"]
    put += ["--env", "GREETING=hello", "--env", 'LIMIT={"max": 3}', "--cpu-ms", "2000"]
    assert runner.invoke(cli, put).exit_code == 0
    bare = runner.invoke(cli, ["workers", "put", "bare", str(source), "--data-dir", data])
    assert bare.exit_code == 0, bare.output

    stored = ServiceStore(Path(data)).get_worker("default", "counter")
    assert stored is not None
    assert stored["env"] == {"GREETING": "hello", "LIMIT": {"max": 3}}
    assert stored["bindings"] == {
        "SDK": {"type": "sdk", "read": True, "write": True},
        "NOTES": {"type": "kv", "read": True, "write": False},
    }
    assert stored["limits"]["cpu_ms"] == 2000
    assert stored["limits"]["wall_ms"] == 30_000  # the definition's default

    with running_cli("serve", "--data-dir", data) as service:
        url = f"{service.url}/workers/counter/fetch/page"
        assert httpx.get(url, timeout=30).text == "hello #1 of 3 https://counter/page"
        assert httpx.get(url, timeout=30).text == "hello #2 of 3 https://counter/page"
        # Without the binding the same code has no sdk.kv: the code's error, 422.
        unbound = httpx.get(f"{service.url}/workers/bare/fetch/", timeout=30)
        assert unbound.status_code == 422
        assert "sdk.kv is not available" in unbound.json()["error"]["message"]


def test_workers_put_refuses_a_worker_that_does_not_load_in_one_line(tmp_path: Path) -> None:
    source = tmp_path / "site"
    (source / "lib").mkdir(parents=True)
    (source / "main.py").write_text("from lib import helper\n")
    (source / "lib" / "__init__.py").write_text("")
    (source / "lib" / "helper.py").write_text("x = 1\n\ndef broken(:\n    pass\n")
    data = tmp_path / "data"
    result = CliRunner().invoke(
        cli, ["workers", "put", "site", str(source), "--data-dir", str(data)]
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "Error: site not stored: lib/helper.py:3: SyntaxError: invalid syntax"
    ]
    assert ServiceStore(data).get_worker("default", "site") is None


def test_workers_put_refuses_what_the_service_refuses(tmp_path: Path) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text("async def fetch(request, env, ctx):\n    pass\n")
    (source / "config.json").write_text('{"ratio": NaN}')  # Python's json reads NaN
    data = tmp_path / "data"
    result = CliRunner().invoke(
        cli, ["workers", "put", "site", str(source), "--data-dir", str(data)]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: site not stored: modules['config.json']['json']['ratio'] is nan"
    )
    assert ServiceStore(data).get_worker("default", "site") is None


def test_workers_put_refuses_bad_options_before_loading(tmp_path: Path) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text(COUNTER)
    (source / "broken.json").write_text("{1")
    runner = CliRunner()
    base = ["workers", "put", "site", str(source), "--data-dir", str(tmp_path / "data")]

    bad_json = runner.invoke(cli, base)
    assert bad_json.exit_code == 1
    assert bad_json.stderr.startswith("Error: site not stored: broken.json:1: JSONDecodeError: ")
    (source / "broken.json").unlink()

    for extra, message in [
        (["--binding", "SDK=nope"], "'nope' is not a binding type"),
        (["--binding", "SDK"], "'SDK' is not NAME=TYPE"),
        (["--env", "A=1", "--binding", "A=kv"], "A: given as both --env and --binding"),
        (["--cpu-ms", "0"], "limits.cpu_ms: Input should be greater than or equal to 1"),
    ]:
        refused = runner.invoke(cli, [*base, *extra])
        assert refused.exit_code != 0
        assert message in refused.stderr, (extra, refused.stderr)
    refused = runner.invoke(cli, ["workers", "put", "../x", *base[3:]])
    assert "'../x' is not a worker id" in refused.stderr


def test_env_values_are_json_when_they_parse_and_strings_otherwise(tmp_path: Path) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text(COUNTER)
    data = tmp_path / "data"
    put = ["workers", "put", "site", str(source), "--data-dir", str(data)]
    for pair in ["N=3", "ON=true", "L=[1, 2.5]", "NAME=ada", 'ID="3"', "NAN=NaN", "EMPTY="]:
        put += ["--env", pair]
    result = CliRunner().invoke(cli, put)
    assert result.exit_code == 0, result.output
    stored = ServiceStore(data).get_worker("default", "site")
    assert stored is not None
    assert stored["env"] == {
        "N": 3,
        "ON": True,
        "L": [1, 2.5],
        "NAME": "ada",
        "ID": "3",
        "NAN": "NaN",
        "EMPTY": "",
    }
    huge = CliRunner().invoke(cli, [*put, "--env", "BIG=1e999"])
    assert huge.exit_code == 2
    assert "BIG: 1e999 is beyond a float's range" in huge.stderr


def test_workers_put_stores_an_api_binding_the_service_will_fill(tmp_path: Path) -> None:
    source = tmp_path / "site"
    source.mkdir()
    (source / "main.py").write_text("async def fetch(request, env, ctx):\n    pass\n")
    data = tmp_path / "data"
    put = ["workers", "put", "site", str(source), "--data-dir", str(data), "--binding", "API=api"]
    result = CliRunner().invoke(cli, put)
    assert result.exit_code == 0, result.output
    stored = ServiceStore(data).get_worker("default", "site")
    assert stored is not None
    assert stored["bindings"] == {"API": {"type": "api", "read": True, "write": True}}
