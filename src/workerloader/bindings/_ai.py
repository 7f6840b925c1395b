"""AI: chat completions and embeddings against any OpenAI-compatible endpoint.

The endpoint, model and key come from the host's configuration; the key never enters a worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from .._errors import BindingError
from ..rpc import RpcTarget

__all__ = ["AiBinding", "AiConfig"]


@dataclass(frozen=True)
class AiConfig:
    """Where the AI binding sends requests."""

    base_url: str
    """E.g. ``https://api.openai.com/v1`` or a local server's ``http://127.0.0.1:8000/v1``."""
    model: str
    embedding_model: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0


CHAT_OPTIONS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "response_format",
        "tools",
        "tool_choice",
        "user",
    }
)
"""What ``chat(messages, **options)`` passes on to the provider."""


class AiBinding(RpcTarget):
    """``chat(messages)`` and ``embed(texts)`` through the configured provider."""

    def __init__(self, config: AiConfig | None) -> None:
        self._config = config

    def _require(self) -> AiConfig:
        if self._config is None:
            raise BindingError(
                "no AI provider configured: the service takes one from [ai] base_url and "
                "model in workerloader.toml (or WORKERLOADER_AI_BASE_URL and "
                "WORKERLOADER_AI_MODEL), a Loader from Loader(ai=AiConfig(...))"
            )
        return self._config

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        config = self._require()
        headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        url = config.base_url.rstrip("/") + path
        try:
            async with httpx.AsyncClient(timeout=config.timeout_s) as client:
                response = await client.post(url, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            raise BindingError(f"the AI provider could not be reached: {exc}") from None
        if response.status_code != 200:
            raise BindingError(
                f"the AI provider answered {response.status_code}: {response.text[:500]}"
            )
        try:
            result = response.json()
        except ValueError:
            raise BindingError(
                f"the AI provider's answer is not JSON: {response.text[:200]!r}"
            ) from None
        if not isinstance(result, dict):
            raise BindingError("the AI provider's answer is not a JSON object")
        return result

    async def chat(self, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """A chat completion: ``{"content", "message", "usage", "raw"}``. ``options`` are
        the OpenAI-style ones in ``CHAT_OPTIONS`` (``temperature``, ``max_tokens``, ...),
        sent as they are; any other is a BindingError: the model is the host's to choose and
        its key pays (``model``, a provider's ``models`` fallbacks, ``n`` copies), and the
        answer is read whole (``stream``)."""
        config = self._require()
        refused = sorted(set(options) - CHAT_OPTIONS)
        if refused:
            raise BindingError(
                f"chat() takes no {', '.join(refused)}: it takes {', '.join(sorted(CHAT_OPTIONS))}"
                f" (the host sets the model, {config.model}, and reads the answer whole)"
            )
        raw = await self._post(
            "/chat/completions", {"model": config.model, "messages": messages, **options}
        )
        try:
            message = raw["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise BindingError("the AI provider's answer has no choices[0].message") from None
        return {
            "content": message.get("content"),
            "message": message,
            "usage": raw.get("usage"),
            "raw": raw,
        }

    async def embed(self, texts: list[str] | str) -> list[list[float]]:
        """One embedding per text."""
        config = self._require()
        model = config.embedding_model or config.model
        raw = await self._post("/embeddings", {"model": model, "input": texts})
        try:
            return [item["embedding"] for item in raw["data"]]
        except (KeyError, TypeError):
            raise BindingError("the AI provider's answer has no data[].embedding") from None
