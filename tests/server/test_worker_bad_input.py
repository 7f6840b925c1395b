"""Bad input to /workers answers a typed JSON 400 that says what is wrong, never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

MAIN = """
from workers import WorkerEntrypoint


class Echo(WorkerEntrypoint):
    async def echo(self, *args, **kwargs):
        return [list(args), kwargs]
"""

DEFINITION: dict[str, Any] = {"main_module": "main.py", "modules": {"main.py": MAIN}}


def assert_bad_request(answer: httpx.Response, *needles: str) -> str:
    """``answer`` is the service's 400 with a message holding each of ``needles``; the
    message."""
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["ok"] is False
    assert body["error"]["type"] == "BadRequest"
    message = body["error"]["message"]
    assert isinstance(message, str)
    for needle in needles:
        assert needle in message
    return message


def raw_definition(env: str = "{}", more_modules: str = "") -> bytes:
    """DEFINITION as JSON text with ``env`` and ``more_modules`` (entries) spliced in as
    sent: httpx's encoder refuses inf and NaN, and ``1e999`` only becomes inf when parsed."""
    modules = '{"main.py": ' + json.dumps(MAIN) + (", " + more_modules if more_modules else "")
    return ('{"main_module": "main.py", "modules": ' + modules + '}, "env": ' + env + "}").encode()


@pytest.mark.parametrize("data", ["a", "abcde", "é", "!!", "@@@@", "aG=k", 5, None, ["YQ=="]])
async def test_a_module_whose_data_is_not_base64_is_refused_naming_it(
    client: httpx.AsyncClient, data: object
) -> None:
    modules = {**DEFINITION["modules"], "blob.bin": {"data_base64": data}}
    refused = await client.put("/workers/w", json={**DEFINITION, "modules": modules})
    assert_bad_request(refused, "modules['blob.bin']", "data_base64")
    assert (await client.get("/workers/w")).status_code == 404


async def test_a_module_of_valid_base64_is_stored(client: httpx.AsyncClient) -> None:
    modules = {**DEFINITION["modules"], "blob.bin": {"data_base64": "aG\nk="}}  # wrapped
    stored = await client.put("/workers/w", json={**DEFINITION, "modules": modules})
    assert stored.json() == {"ok": True, "id": "w", "version": 1}


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ('{"a": 1e999}', "env['a']"),
        ('{"a": -1e999}', "env['a']"),
        ('{"a": NaN}', "env['a']"),
        ('{"a": Infinity}', "env['a']"),
        ('{"a": {"b": [1, 2.5, -Infinity]}}', "env['a']['b'][2]"),
    ],
)
async def test_a_non_finite_float_in_env_is_refused_naming_where(
    client: httpx.AsyncClient, env: str, where: str
) -> None:
    refused = await client.put("/workers/w", content=raw_definition(env=env))
    assert_bad_request(refused, where)
    # Nothing was stored: the worker neither exists nor breaks the listing.
    assert (await client.get("/workers/w")).status_code == 404
    assert (await client.get("/workers")).json() == {"workers": []}


async def test_a_non_finite_float_in_a_json_module_is_refused_naming_where(
    client: httpx.AsyncClient,
) -> None:
    config = '"config.json": {"json": {"x": [1e999]}}'
    refused = await client.put("/workers/w", content=raw_definition(more_modules=config))
    assert_bad_request(refused, "modules['config.json']['json']['x'][0]")
    assert (await client.get("/workers/w")).status_code == 404


async def test_finite_floats_in_env_are_stored_and_served(client: httpx.AsyncClient) -> None:
    stored = await client.put("/workers/w", json={**DEFINITION, "env": {"a": 1e308, "b": -0.5}})
    assert stored.status_code == 200
    got = await client.get("/workers/w")
    assert got.status_code == 200
    assert got.json()["env"] == {"a": 1e308, "b": -0.5}


@pytest.mark.parametrize("body", [b"5", b'"x"', b"null", b"true", b"2.5"])
async def test_an_rpc_body_neither_a_list_nor_an_object_is_refused(
    client: httpx.AsyncClient, body: bytes
) -> None:
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    refused = await client.post("/workers/w/rpc/Echo/echo", content=body)
    assert_bad_request(refused, '{"args": [...], "kwargs": {...}}', "list")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{", "JSON"),
        (b'{"args": 5}', '"args"'),
        (b'{"args": [], "kwargs": [1]}', '"kwargs"'),
    ],
)
async def test_every_rpc_bad_request_carries_a_message(
    client: httpx.AsyncClient, body: bytes, needle: str
) -> None:
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    refused = await client.post("/workers/w/rpc/Echo/echo", content=body)
    assert_bad_request(refused, needle)


async def test_good_rpc_bodies_still_call(client: httpx.AsyncClient) -> None:
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    for body, result in [
        (b"", [[], {}]),
        (b"[1, 2]", [[1, 2], {}]),
        (b'{"args": [1], "kwargs": {"k": "v"}}', [[1], {"k": "v"}]),
        (b"{}", [[], {}]),
    ]:
        called = await client.post("/workers/w/rpc/Echo/echo", content=body)
        assert called.status_code == 200, called.text
        assert called.json()["result"] == result


@pytest.mark.parametrize("name", ["/etc/passwd.py", "a/../../b.py", "./x.py", "a//b.py", "x\0.py"])
async def test_a_module_name_that_is_not_a_plain_relative_path_is_refused(
    client: httpx.AsyncClient, name: str
) -> None:
    modules = {**DEFINITION["modules"], name: "x = 1\n"}
    refused = await client.put("/workers/w", json={**DEFINITION, "modules": modules})
    assert refused.status_code == 422, refused.text
    assert "expected a relative path of plain names" in refused.json()["error"]["message"]


async def test_an_unknown_limit_is_refused(client: httpx.AsyncClient) -> None:
    refused = await client.put("/workers/w", json={**DEFINITION, "limits": {"cpu_msec": 5}})
    assert_bad_request(refused, "cpu_msec")
    answer = await client.post("/execute", json={"code": "return 1", "limits": {"memory": 64}})
    assert_bad_request(answer, "memory")


async def test_an_rpc_body_nested_too_deeply_is_refused(client: httpx.AsyncClient) -> None:
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    deep = b"[" * 3000 + b"]" * 3000
    answer = await client.post("/workers/w/rpc/Echo/echo", content=deep)
    assert_bad_request(answer, "nested too deeply")


@pytest.mark.parametrize("method", ["__getattribute__", "_stub"])
async def test_rpc_reaches_only_the_workers_own_methods(
    client: httpx.AsyncClient, method: str
) -> None:
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    ran = await client.post("/workers/w/rpc/Echo/echo", json=[1])
    assert ran.json()["cpu_ms"] > 0
    answer = await client.post(f"/workers/w/rpc/Echo/{method}", json=["_stub"])
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["type"] == "AttributeError", error
    assert "are never a worker's methods" in error["message"]
    assert answer.json()["cpu_ms"] == 0  # no worker ran (not the last call's figure)


async def test_rpc_sends_fetch_to_the_fetch_proxy(client: httpx.AsyncClient) -> None:
    # fetch takes a request and answers a response: over RPC it would answer their wire form.
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    answer = await client.post("/workers/w/rpc/Echo/fetch", json=["https://x/"])
    assert_bad_request(answer, "/workers/w/fetch/")


async def test_rpc_props_from_an_http_caller_are_refused(client: httpx.AsyncClient) -> None:
    # A worker trusts ctx.props as the host's: an HTTP caller may not set them.
    assert (await client.put("/workers/w", json=DEFINITION)).status_code == 200
    answer = await client.post("/workers/w/rpc/Echo/echo", json={"args": [], "props": {"a": 1}})
    assert_bad_request(answer, "props cannot be sent over HTTP")
    answer = await client.post("/workers/w/rpc/Echo/echo", json={"args": [], "kw": {}})
    assert_bad_request(answer, "unknown field(s): kw")
    logged = (await client.get("/logs", params={"worker": "w", "status": 400})).json()["logs"]
    assert [(r["kind"], r["error_type"]) for r in logged] == [("rpc", "BadRequest")] * 2


@pytest.mark.parametrize(
    ("change", "where", "fields"),
    [
        ({"binding": {"KV": {"type": "kv"}}}, "binding:", "main_module, modules, env"),
        ({"bindings": {"KV": {"type": "kv", "writ": False}}}, "bindings.KV.writ:", "type, read"),
        ({"limit": {"cpu_ms": 5}}, "limit:", "limits"),
    ],
)
async def test_a_misspelt_field_of_a_definition_is_refused_listing_the_fields(
    client: httpx.AsyncClient, change: dict[str, Any], where: str, fields: str
) -> None:
    # Dropped, the field would store a worker without what its author meant it to have (a
    # binding left writable, limits at their defaults).
    refused = await client.put("/workers/w", json={**DEFINITION, **change})
    assert_bad_request(refused, where, "unknown field", fields)
    assert (await client.get("/workers/w")).status_code == 404


async def test_a_name_both_env_data_and_a_binding_is_refused(client: httpx.AsyncClient) -> None:
    both = {**DEFINITION, "env": {"KV": "data"}, "bindings": {"KV": {"type": "kv"}}}
    refused = await client.put("/workers/w", json=both)
    assert_bad_request(refused, "KV: named in both env and bindings")


async def test_a_stored_worker_with_bindings_still_serves(client: httpx.AsyncClient) -> None:
    # Stored definitions are read back with the strict model (only its own fields).
    both = {**DEFINITION, "env": {"A": 1}, "bindings": {"KV": {"type": "kv", "write": False}}}
    assert (await client.put("/workers/w", json=both)).status_code == 200
    called = await client.post("/workers/w/rpc/Echo/echo", json=[1])
    assert called.json()["result"] == [[1], {}], called.text


BAD_RESPONSES = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        case = request.url.rsplit("/", 1)[1]
        if case == "framing":
            headers = {"transfer-encoding": "chunked", "content-length": "0", "x-kept": "1"}
            return Response("ok", headers=headers)
        if case == "forged":  # past the constructor's check: the host checks again
            response = Response("ok")
            response.status = 0
            return response
        if case == "status":
            return Response("ok", status=99)
        return Response("ok", headers={"x-bad": "a\\r\\nset-cookie: x=1"})
"""


async def test_a_worker_cannot_set_the_framing_of_the_services_answer(
    client: httpx.AsyncClient,
) -> None:
    # Passed on, a worker's transfer-encoding beside a content-length would let a client or a
    # proxy read the rest of the body as a second response.
    definition = {"main_module": "main.py", "modules": {"main.py": BAD_RESPONSES}}
    assert (await client.put("/workers/r", json=definition)).status_code == 200
    answer = await client.get("/workers/r/fetch/framing")
    assert answer.status_code == 200
    assert answer.text == "ok"
    assert answer.headers["x-kept"] == "1"
    assert "transfer-encoding" not in answer.headers
    assert answer.headers["content-length"] == "2"


@pytest.mark.parametrize(
    ("case", "status", "needle"),
    [
        ("status", 422, "status 99 is not an int in 200-599"),
        ("header", 422, "has a value HTTP cannot carry"),
        ("forged", 502, "malformed response: status 0"),
    ],
)
async def test_a_response_http_cannot_carry_is_refused_with_a_typed_error(
    client: httpx.AsyncClient, case: str, status: int, needle: str
) -> None:
    definition = {"main_module": "main.py", "modules": {"main.py": BAD_RESPONSES}}
    assert (await client.put("/workers/r", json=definition)).status_code == 200
    answer = await client.get(f"/workers/r/fetch/{case}")
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]["message"]
    logged = (await client.get("/logs", params={"worker": "r", "limit": 1})).json()["logs"]
    assert logged[0]["status"] == status


@pytest.mark.parametrize("env", ['{"a": ' + "9" * 2000 + "}", '{"a": ' + "[" * 70 + "]" * 70 + "}"])
async def test_env_data_no_worker_can_take_is_a_400_naming_where(
    client: httpx.AsyncClient, env: str
) -> None:
    refused = await client.put("/workers/w", content=raw_definition(env=env))
    assert_bad_request(refused, "cannot be sent to a worker", "env")
    assert (await client.get("/workers/w")).status_code == 404


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("import os\nos._exit(1)\n", "WorkerCrashed"),
        ("while True:\n    pass\n", "CpuLimitExceeded"),
        ("import time\ntime.sleep(100)\n", "WallTimeExceeded"),
    ],
)
async def test_a_worker_that_dies_or_hits_a_limit_as_it_loads_is_refused_422(
    client: httpx.AsyncClient, source: str, kind: str
) -> None:
    definition = {
        "main_module": "main.py",
        "modules": {"main.py": source + MAIN},
        "limits": {"cpu_ms": 100, "wall_ms": 1000},
    }
    refused = await client.put("/workers/w", json=definition)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["type"] == kind
    assert (await client.get("/workers/w")).status_code == 404


async def test_an_rpc_result_passed_by_reference_is_422_naming_where(
    client: httpx.AsyncClient,
) -> None:
    source = MAIN + "\n    async def fn(self):\n        return {'f': lambda: 1}\n"
    definition = {"main_module": "main.py", "modules": {"main.py": source}}
    assert (await client.put("/workers/w", json=definition)).status_code == 200
    answer = await client.post("/workers/w/rpc/Echo/fn")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["type"] == "NotJsonError"
    assert "result['f'] is a function" in answer.json()["error"]["message"]


async def test_an_invalid_worker_id_is_refused_saying_what_an_id_is(
    client: httpx.AsyncClient,
) -> None:
    refused = await client.put("/workers/-bad", json=DEFINITION)
    assert_bad_request(refused, "'-bad'", "1 to 64 letters, digits")


HEADERS = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        names = ("x-a", "cookie", "authorization")
        return Response.json({k: request.headers.get(k) for k in names})
"""


async def test_repeated_request_headers_reach_the_worker_joined(client: httpx.AsyncClient) -> None:
    definition = {"main_module": "main.py", "modules": {"main.py": HEADERS}}
    assert (await client.put("/workers/h", json=definition)).status_code == 200
    headers = [("x-a", "1"), ("x-a", "2"), ("cookie", "a=1"), ("cookie", "b=2")]
    answer = await client.get("/workers/h/fetch/", headers=headers)
    assert answer.json() == {"x-a": "1, 2", "cookie": "a=1; b=2", "authorization": None}


EDGES = """
from workers import WorkerEntrypoint, Response


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        if request.url.endswith("/204"):
            return Response("a body HTTP does not allow here", status=204)
        return Response.json(sorted(request.headers))
"""


async def test_no_body_goes_out_with_a_204_and_hop_headers_stay_behind(
    client: httpx.AsyncClient,
) -> None:
    definition = {"main_module": "main.py", "modules": {"main.py": EDGES}}
    assert (await client.put("/workers/e", json=definition)).status_code == 200
    empty = await client.get("/workers/e/fetch/204")
    assert (empty.status_code, empty.content) == (204, b"")
    headers = {"proxy-authorization": "Basic c2VjcmV0", "x-drop": "1", "connection": "x-drop"}
    seen = (await client.get("/workers/e/fetch/", headers=headers)).json()
    assert "proxy-authorization" not in seen
    assert "x-drop" not in seen  # named by Connection: this hop's
    assert "connection" not in seen
