"""The AI binding against an OpenAI-compatible server on 127.0.0.1: chat and embeddings with the
configured model and key, provider errors, no provider configured; and ``sdk.ai`` from a worker
in the real sandbox, which uses the key without ever holding it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from workerloader import Loader, WorkerCode, WorkerStub
from workerloader._errors import BindingError
from workerloader.bindings import AiConfig

KEY = "sk-test"
REPLY = "canned reply 7f3a"  # what the server answers; a worker that got it holds it


@dataclass
class Received:
    path: str
    authorization: str | None
    payload: Any


@dataclass
class FakeProvider:
    """A minimal OpenAI-compatible server on 127.0.0.1.

    ``/v1/...`` answers normally; ``/status/<n>/v1/...`` answers status n; ``/odd/v1/...``
    answers 200 with a body in the wrong shape; ``/html/v1/...`` answers 200 with HTML."""

    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _answer(self, path: str, payload: Any) -> tuple[int, str, bytes]:
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
            return status, "text/plain", b"upstream exploded: " + b"e" * 1000
        if path.startswith("/html/"):
            return 200, "text/html", b"<html>captive portal</html>"
        if path.startswith("/odd/"):
            return 200, "application/json", b'{"unexpected": true}'
        if path == "/v1/chat/completions":
            last = payload["messages"][-1]["content"]
            body = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": payload["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"{REPLY}: {last}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
        elif path == "/v1/embeddings":
            texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
            body = {
                "object": "list",
                "model": payload["model"],
                "data": [
                    {"object": "embedding", "index": i, "embedding": [float(len(t)), i + 0.5]}
                    for i, t in enumerate(texts)
                ],
            }
        else:
            return 404, "text/plain", b"no such endpoint"
        return 200, "application/json", json.dumps(body).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")[:-2]
            _, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            payload = json.loads(body) if body else None
            self.received.append(Received(path, headers.get("authorization"), payload))
            status, content_type, reply = self._answer(path, payload)
            writer.write(
                f"HTTP/1.1 {status} Status\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(reply)}\r\nConnection: close\r\n\r\n".encode()
                + reply
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider()
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()


def config(provider: FakeProvider, prefix: str = "", **options: Any) -> AiConfig:
    return AiConfig(base_url=provider.url(prefix), model="m", api_key=KEY, **options)


# ---------------------------------------------------------------------------------------------
# Host side


async def test_chat_returns_content_message_usage_and_sends_model_and_key(
    tmp_path: Path, provider: FakeProvider
) -> None:
    ai = Loader(tmp_path, ai=config(provider)).ai()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    result = await ai.chat(messages, temperature=0.5, max_tokens=10)
    assert result["content"] == f"{REPLY}: hi"
    assert result["message"] == {"role": "assistant", "content": f"{REPLY}: hi"}
    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert result["raw"]["id"] == "chatcmpl-1"
    (received,) = provider.received
    assert received.path == "/v1/chat/completions"
    assert received.authorization == f"Bearer {KEY}"
    assert received.payload == {
        "model": "m",
        "messages": messages,
        "temperature": 0.5,
        "max_tokens": 10,
    }


async def test_the_model_is_the_hosts_to_choose(tmp_path: Path, provider: FakeProvider) -> None:
    # A worker naming another model spent the host's key on it.
    ai = Loader(tmp_path, ai=config(provider)).ai()
    for option in ({"model": "gpt-4-32k"}, {"stream": True}, {"models": ["x"]}, {"n": 8}):
        with pytest.raises(BindingError, match=r"^chat\(\) takes no (models?|stream|n): it "):
            await ai.chat([{"role": "user", "content": "x"}], **option)
    assert provider.received == []


async def test_a_trailing_slash_in_base_url_is_fine(tmp_path: Path, provider: FakeProvider) -> None:
    ai = Loader(tmp_path, ai=AiConfig(base_url=provider.url() + "/", model="m")).ai()
    assert (await ai.chat([{"role": "user", "content": "x"}]))["content"] == f"{REPLY}: x"
    assert provider.received[0].path == "/v1/chat/completions"


async def test_embed_returns_one_vector_per_text(tmp_path: Path, provider: FakeProvider) -> None:
    ai = Loader(tmp_path, ai=config(provider)).ai()
    assert await ai.embed(["a", "bcd"]) == [[1.0, 0.5], [3.0, 1.5]]
    assert await ai.embed("single") == [[6.0, 0.5]]
    first, second = provider.received
    assert (first.path, first.authorization) == ("/v1/embeddings", f"Bearer {KEY}")
    assert first.payload == {"model": "m", "input": ["a", "bcd"]}
    assert second.payload == {"model": "m", "input": "single"}


async def test_embed_uses_the_embedding_model_when_one_is_configured(
    tmp_path: Path, provider: FakeProvider
) -> None:
    ai = Loader(tmp_path, ai=config(provider, embedding_model="emb")).ai()
    await ai.embed(["a"])
    await ai.chat([{"role": "user", "content": "x"}])
    assert [r.payload["model"] for r in provider.received] == ["emb", "m"]


async def test_without_a_key_no_authorization_header_is_sent(
    tmp_path: Path, provider: FakeProvider
) -> None:
    ai = Loader(tmp_path, ai=AiConfig(base_url=provider.url(), model="m")).ai()
    await ai.chat([{"role": "user", "content": "x"}])
    assert provider.received[0].authorization is None


NO_PROVIDER = r"^no AI provider configured: the service takes one from \[ai\] base_url"


async def test_without_a_provider_every_call_is_a_binding_error(tmp_path: Path) -> None:
    ai = Loader(tmp_path).ai()
    with pytest.raises(BindingError, match=NO_PROVIDER):
        await ai.chat([{"role": "user", "content": "x"}])
    with pytest.raises(BindingError, match=NO_PROVIDER):
        await ai.embed(["a"])


@pytest.mark.parametrize("status", [500, 401, 429])
async def test_a_provider_error_status_is_a_binding_error_with_the_status(
    tmp_path: Path, provider: FakeProvider, status: int
) -> None:
    ai = Loader(tmp_path, ai=config(provider, f"/status/{status}")).ai()
    expected = f"the AI provider answered {status}: upstream exploded: eee"
    with pytest.raises(BindingError, match="^" + re.escape(expected)) as info:
        await ai.chat([{"role": "user", "content": "x"}])
    assert len(str(info.value)) <= len(f"the AI provider answered {status}: ") + 500
    with pytest.raises(BindingError, match="^" + re.escape(expected)):
        await ai.embed(["a"])


async def test_an_answer_without_choices_or_data_is_a_binding_error(
    tmp_path: Path, provider: FakeProvider
) -> None:
    ai = Loader(tmp_path, ai=config(provider, "/odd")).ai()
    with pytest.raises(
        BindingError, match=r"^the AI provider's answer has no choices\[0\]\.message$"
    ):
        await ai.chat([{"role": "user", "content": "x"}])
    with pytest.raises(
        BindingError, match=r"^the AI provider's answer has no data\[\]\.embedding$"
    ):
        await ai.embed(["a"])


async def test_an_answer_that_is_not_json_is_a_binding_error(
    tmp_path: Path, provider: FakeProvider
) -> None:
    # A 200 from something that is not the provider (a proxy's or captive portal's HTML page)
    # is a provider failure like the others, not a JSON decoding error from inside the binding.
    ai = Loader(tmp_path, ai=config(provider, "/html")).ai()
    with pytest.raises(BindingError, match=r"^the AI provider"):
        await ai.chat([{"role": "user", "content": "x"}])


async def test_an_unreachable_provider_is_a_binding_error(
    tmp_path: Path, provider: FakeProvider
) -> None:
    await provider.close()  # nothing listens on the port any more
    ai = Loader(tmp_path, ai=config(provider, timeout_s=2)).ai()
    with pytest.raises(BindingError, match=r"^the AI provider could not be reached: "):
        await ai.chat([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------
# From a worker in the real sandbox


WORKER = """
import gc
from workers import WorkerEntrypoint, sdk

KEPT = []


def strings_in(obj):
    if isinstance(obj, (str, bytes)):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from strings_in(item)


class Api(WorkerEntrypoint):
    async def chat(self, text):
        result = await sdk.ai.chat([{"role": "user", "content": text}], temperature=0)
        KEPT.append(result)
        return result

    async def embed(self, texts):
        return await sdk.ai.embed(texts)

    async def views(self):
        return {
            "repr(sdk.ai)": repr(sdk.ai),
            "str(sdk.ai)": str(sdk.ai),
            "dir(sdk.ai)": repr(dir(sdk.ai)),
            "repr(env)": repr(self.env),
            "repr(env.SDK)": repr(self.env.SDK),
            "vars(env)": repr(vars(self.env)),
            "repr(sdk.context)": repr(sdk.context),
        }

    async def probe(self):
        # What a hostile worker might try: the binding's private state over RPC, by paths
        # the stub refuses locally, sent as raw promises.
        promise = type(sdk.ai.chat)
        answers = {}
        for path in (["_config"], ["_config", "api_key"], ["__dict__"], ["_require"],
                     ["chat", "__self__"], ["chat", "__func__", "__globals__"],
                     ["config"], ["api_key"], ["__class__"]):
            try:
                answers["/".join(path)] = ["ok", repr(await promise(sdk.ai._rpc, sdk.ai, path,
                                                                    None))]
            except Exception as exc:
                answers["/".join(path)] = [type(exc).__name__, str(exc)]
        return answers

    async def containers_holding(self, reversed_needle):
        # Every str or bytes inside any container the garbage collector tracks. The needle
        # comes reversed, so that the argument itself never contains it.
        found = 0
        for obj in gc.get_objects():
            for s in strings_in(obj) if isinstance(obj, (dict, list, tuple, set)) else ():
                text = s if isinstance(s, str) else s.decode("latin-1")
                found += reversed_needle in text[::-1]
        return found
"""


@pytest.fixture
async def loader(tmp_path: Path, provider: FakeProvider) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2, ai=config(provider)) as loader:
        yield loader


def worker_stub(loader: Loader, env: dict[str, object]) -> WorkerStub:
    code = WorkerCode(main_module="main.py", modules={"main.py": WORKER}, env=env)
    return loader.get("w", lambda: code)


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process ``pid`` contains ``needle`` (we are root)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, ValueError, OverflowError):
                continue
    return False


async def test_a_worker_chats_and_embeds_through_sdk_ai(
    loader: Loader, provider: FakeProvider
) -> None:
    api: Any = worker_stub(loader, {"SDK": loader.sdk("t")}).get_entrypoint("Api")
    result = await api.chat("hello from the sandbox")
    assert result["content"] == f"{REPLY}: hello from the sandbox"
    assert result["usage"]["total_tokens"] == 9
    assert await api.embed(["ab", "c"]) == [[2.0, 0.5], [1.0, 1.5]]
    # The provider got exactly the host's key and model, whatever the worker sent.
    assert [(r.path, r.authorization) for r in provider.received] == [
        ("/v1/chat/completions", f"Bearer {KEY}"),
        ("/v1/embeddings", f"Bearer {KEY}"),
    ]
    assert provider.received[0].payload == {
        "model": "m",
        "messages": [{"role": "user", "content": "hello from the sandbox"}],
        "temperature": 0,
    }


async def test_a_worker_without_a_provider_gets_the_binding_error(
    tmp_path: Path,
) -> None:
    async with Loader(tmp_path / "data", pool_size=1) as loader:
        api: Any = worker_stub(loader, {"SDK": loader.sdk("t")}).get_entrypoint("Api")
        with pytest.raises(BindingError) as info:
            await api.chat("x")
        assert str(info.value).startswith("no AI provider configured: ")


async def test_the_worker_never_holds_the_key(loader: Loader, provider: FakeProvider) -> None:
    stub = worker_stub(loader, {"SDK": loader.sdk("t")})
    api: Any = stub.get_entrypoint("Api")
    assert (await api.chat("x"))["content"] == f"{REPLY}: x"

    views = await api.views()
    assert views["repr(env)"] == "Env(['SDK'])"
    for name, text in views.items():
        assert KEY not in text, name
    assert "RpcStub" in views["repr(sdk.ai)"]

    probes = await api.probe()
    assert set(probes) == {
        "_config",
        "_config/api_key",
        "__dict__",
        "_require",
        "chat/__self__",
        "chat/__func__/__globals__",
        "config",
        "api_key",
        "__class__",
    }
    for path, answer in probes.items():
        # Refused by the host (a local refusal would say names starting with '_' are never
        # reachable), and nothing of the binding's state came back.
        assert answer[0] == "AttributeError", (path, answer)
        assert re.fullmatch(r"'(AiBinding|method)' object has no RPC member '\w+'", answer[1])
        assert KEY not in json.dumps(answer), path

    # The worker process's whole memory, read from the host: the canned reply the worker
    # received is there, the key is not.
    worker = stub._worker
    assert worker is not None
    assert memory_holds(worker.process.pid, REPLY.encode())
    assert not memory_holds(worker.process.pid, KEY.encode())
    # The same for the worker's own objects, searched from inside.
    assert await api.containers_holding(REPLY[::-1]) >= 1
    assert await api.containers_holding(KEY[::-1]) == 0

    assert {r.authorization for r in provider.received} == {f"Bearer {KEY}"}
    assert len(provider.received) == 1
