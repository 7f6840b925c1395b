"""Request-body schemas for OpenAPI: pydantic's JSON Schema with its ``$defs`` inlined.

Routes that read their body themselves (to accept JSON whatever the Content-Type) declare it
with ``openapi_extra``; a ``#/$defs/...`` reference there would point nowhere in the OpenAPI
document, so the definitions are substituted in place.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["body_schema"]


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema, self-contained (no ``$ref``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result
