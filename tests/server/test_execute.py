"""The service end to end: a real uvicorn server on loopback, driven over HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest


async def test_health_reports_sandbox_and_auth_mode(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["sandbox"] == "confined"
    assert body["auth"] == "dev"


async def test_the_seed_curl_session_answers_4(client: httpx.AsyncClient) -> None:
    # curl -X POST localhost:8787/execute -d '{"code":"return 2 + 2"}' (form content type)
    response = await client.post(
        "/execute",
        content=b'{"code":"return 2 + 2"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["result"] == 4
    assert body["logs"] == []
    assert body["duration_ms"] > 0
    assert 0 < body["cpu_ms"] < body["duration_ms"]  # a worker's CPU, and it ran one call


async def test_execute_reaches_the_sdk_and_returns_logs(client: httpx.AsyncClient) -> None:
    code = (
        'print("hi")\n'
        'await db.create("users", {"name": "ada"})\n'
        'return [u["name"] for u in await db.list("users")]'
    )
    body = (await client.post("/execute", json={"code": code})).json()
    assert body == {
        "ok": True,
        "result": ["ada"],
        "logs": ["hi"],
        "duration_ms": body["duration_ms"],
        "cpu_ms": body["cpu_ms"],
    }


async def test_cpu_ms_is_the_workers_cpu_time_for_the_call(client: httpx.AsyncClient) -> None:
    burn = (
        "import time\nend = time.process_time() + 0.1\nwhile time.process_time() < end:\n    pass"
    )
    body = (await client.post("/execute", json={"code": burn})).json()
    assert body["ok"] is True
    assert 100 <= body["cpu_ms"] <= body["duration_ms"]
    sleep = (await client.post("/execute", json={"code": "import time\ntime.sleep(0.1)"})).json()
    assert sleep["duration_ms"] >= 100
    assert 0 < sleep["cpu_ms"] < 100  # waiting is not CPU
    failed = (await client.post("/execute", json={"code": burn + "\nraise ValueError()"})).json()
    assert failed["error"]["type"] == "ValueError"
    assert failed["cpu_ms"] >= 100


async def test_a_syntax_error_is_422_with_the_users_line(client: httpx.AsyncClient) -> None:
    response = await client.post("/execute", json={"code": "x = 1\nreturn x +"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "SyntaxError"
    assert error["line"] == 2


async def test_a_runtime_error_is_422_with_the_users_traceback(client: httpx.AsyncClient) -> None:
    response = await client.post("/execute", json={"code": "x = 1\n\nraise ValueError('boom')"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "boom"
    assert 'File "execute.py", line 3, in main' in error["traceback"]


async def test_a_result_that_cannot_cross_names_where_it_sits(client: httpx.AsyncClient) -> None:
    response = await client.post("/execute", json={"code": "return {'f': lambda: 1}"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "DataCloneError"
    assert error["message"] == (
        "result['f']: cannot clone a function object"
        " (only data can cross here: no functions, stubs or RpcTarget instances)"
    )
    # No user frame raised it: no empty "Traceback (most recent call last):" header either.
    assert not error["traceback"].startswith("Traceback"), error["traceback"]


async def test_a_result_over_what_a_message_carries_is_422_saying_so(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/execute", json={"code": "return 'x' * 5_000_000"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "FrameTooLarge"
    assert error["message"].startswith("the result took 5000"), error["message"]
    assert "over the 4194304 bytes one message carries" in error["message"]
    assert (await client.post("/execute", json={"code": "return 1"})).json()["result"] == 1


async def test_a_cyclic_result_is_422_naming_where(client: httpx.AsyncClient) -> None:
    code = "a = [1, {'b': []}]\na[1]['b'].append(a)\nreturn a"
    response = await client.post("/execute", json={"code": code})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "NotJsonError"
    assert error["message"] == (
        "result[1]['b'][0] contains itself (a cycle), which JSON cannot carry"
    )
    shared = "x = [1]\nreturn [x, x]"  # the same list twice is no cycle
    assert (await client.post("/execute", json={"code": shared})).json()["result"] == [[1], [1]]


async def test_a_worker_that_dies_is_502(client: httpx.AsyncClient) -> None:
    response = await client.post("/execute", json={"code": "import os\nos._exit(3)"})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "WorkerCrashed"


async def test_wall_time_is_504(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/execute", json={"code": "import time\ntime.sleep(5)", "timeout_ms": 1000}
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "WallTimeExceeded"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"cod": "x"}',
        b'{"code": 1}',
        b'{"code": "1", "language": "js"}',
        b"[]",
        b'{"code": "return 1", "timeout": 5000}',  # misspelt: not silently ignored
    ],
)
async def test_a_malformed_body_is_400_never_500(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/execute", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequest"


async def test_a_body_over_the_cap_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/execute", content=b'{"code": "' + b"x" * (1 << 21) + b'"}')
    assert response.status_code == 413


async def test_openapi_is_served(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/execute" in spec["paths"]
    assert (await client.get("/docs")).status_code == 200
    # A malformed request is documented as what it is answered with: 400, not FastAPI's 422.
    logs = spec["paths"]["/logs"]["get"]["responses"]
    assert "400" in logs
    assert "422" not in logs
    assert (await client.get("/logs", params={"limit": 0})).status_code == 400


async def test_the_sdks_bindings_are_in_scope_by_name(client: httpx.AsyncClient) -> None:
    code = "return [x is getattr(sdk, n) for n, x in zip(NAMES, [db, kv, sql, blobs, ai, api])]"
    names = "NAMES = ['db', 'kv', 'sql', 'blobs', 'ai', 'api']\n"
    body = (await client.post("/execute", json={"code": names + code})).json()
    assert body["result"] == [True] * 6
    body = (await client.post("/execute", json={"code": "return context.namespace"})).json()
    assert body["result"] == "default"


@pytest.mark.parametrize(
    ("code", "where"),
    [
        ("return float('inf')", "result"),
        ("return {'a': [1, float('nan')]}", "result['a'][1]"),
    ],
)
async def test_a_result_json_cannot_carry_is_422_naming_where(
    client: httpx.AsyncClient, code: str, where: str
) -> None:
    response = await client.post("/execute", json={"code": code})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "NotJsonError"
    assert error["message"].startswith(f"{where} is ")


async def test_the_callers_context_is_data_the_code_may_return(client: httpx.AsyncClient) -> None:
    body = (await client.post("/execute", json={"code": "return context"})).json()
    assert body["result"] == {
        "user_id": None,
        "namespace": "default",
        "authenticated": False,
        "permissions": ["read", "write"],
    }
    code = "return [context.namespace, context['namespace'], context.permissions]"
    body = (await client.post("/execute", json={"code": code})).json()
    assert body["result"] == ["default", "default", ["read", "write"]]


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        ("return {1: 'a', '1': 'b'}", "two keys that are both '1'"),
        ("return {'x': {None: 1, 'None': 2}}", "result['x'] has two keys"),
        ("return {10 ** 5000: 1}", "int with more than 1000 digits"),
    ],
)
async def test_keys_json_would_merge_or_cannot_carry_are_422_not_lost(
    client: httpx.AsyncClient, code: str, needle: str
) -> None:
    answer = await client.post("/execute", json={"code": code})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["type"] == ("DataCloneError" if "digits" in needle else "NotJsonError")
    assert needle in error["message"]


async def test_unknown_routes_and_methods_answer_in_the_services_error_shape(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.get("/no/such/route")
    assert missing.status_code == 404
    assert missing.json() == {"ok": False, "error": {"type": "NotFound", "message": "Not Found"}}
    wrong = await client.delete("/execute")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["type"] == "MethodNotAllowed"
    assert "POST" in wrong.headers["allow"]


async def test_error_messages_say_each_thing_once(client: httpx.AsyncClient) -> None:
    not_json = (await client.post("/execute", content=b"{nope")).json()["error"]["message"]
    assert not_json.startswith("Invalid JSON"), not_json  # no empty location before it
    syntax = (await client.post("/execute", json={"code": "return x +"})).json()["error"]
    assert syntax["type"] == "SyntaxError"
    assert not syntax["message"].startswith(("SyntaxError", "execute.py")), syntax


async def test_headers_over_the_cap_are_431(client: httpx.AsyncClient) -> None:
    answer = await client.get("/health", headers={"x-big": "x" * (65 << 10)})
    assert answer.status_code == 431
    assert answer.json()["error"]["type"] == "RequestHeaderFieldsTooLarge"
    assert (await client.get("/health", headers={"x-fine": "x" * 1000})).status_code == 200


async def test_each_executions_worker_is_stopped_after_its_answer(
    client: httpx.AsyncClient,
) -> None:
    # One returns while a task of its own runs on; stopping it is not left to the code.
    code = (
        "import asyncio\n"
        "async def forever():\n"
        "    while True:\n"
        "        await asyncio.sleep(0.01)\n"
        "asyncio.get_running_loop().create_task(forever())\n"
        "return 1"
    )
    for snippet in ("return 1", code, "return 1"):
        assert (await client.post("/execute", json={"code": snippet})).json()["result"] == 1
    for _ in range(250):
        if (await client.get("/health")).json()["workers"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await client.get("/health")).json()["workers"] == 0
