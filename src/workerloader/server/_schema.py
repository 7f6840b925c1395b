"""Request-body schemas for OpenAPI: pydantic's JSON Schema with its ``$defs`` inlined.

Routes that read their body themselves (to accept JSON whatever the Content-Type) declare it
with ``openapi_extra``; a ``#/$defs/...`` reference there would point nowhere in the OpenAPI
document, so the definitions are substituted in place.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

__all__ = ["bad_request", "body_schema", "error_answer", "statuses_as_answered"]


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads ``model`` as its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(model)}},
        }
    }


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


def error_answer(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The service's answer for a request it refuses: ``{"ok": false, "error": {"type":
    kind, "message"}}`` with ``status``."""
    error = {"type": kind, "message": message}
    return JSONResponse({"ok": False, "error": error}, status, headers=headers)


def bad_request(
    exc: ValidationError | RequestValidationError, model: type[BaseModel] | None = None
) -> JSONResponse:
    """400 with where the body is wrong: a malformed body is the client's mistake (422 is
    kept for user code that failed). With the body's ``model``, an unknown field's message
    lists the fields that place takes."""
    errors = exc.errors()
    for e in errors:
        known = _fields_at(model, e["loc"][:-1]) if e["type"] == "extra_forbidden" else None
        if known:
            e["msg"] = f"unknown field (the fields here: {', '.join(known)})"
    details = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
    message = "; ".join(
        (".".join(map(str, e["loc"])) + ": " if e["loc"] else "") + str(e["msg"]) for e in errors
    )
    error = {"type": "BadRequest", "message": message, "details": details}
    return JSONResponse({"ok": False, "error": error}, 400)


def _fields_at(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model that sits at ``loc`` in a body of ``model`` (following
    fields, dict values and optional models), or none if it is not a model."""
    node: object = model
    for step in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(step))
            node = field.annotation if field is not None else None
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]  # ``step`` is a key
        else:
            return []
        if typing.get_origin(node) in (typing.Union, types.UnionType):  # ``Model | None``
            models = (a for a in typing.get_args(node) if isinstance(a, type))
            node = next((a for a in models if issubclass(a, BaseModel)), node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


_ERROR = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "ok": {"const": False},
                    "error": {
                        "type": "object",
                        "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            }
        }
    }
}


def statuses_as_answered(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (FastAPI's OpenAPI document) with the statuses the service really answers: a
    malformed request is a 400 here (FastAPI documents its validation errors as 422, which
    this service keeps for user code that failed)."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            validation = responses.pop("422", None)
            if validation is not None:
                responses["400"] = {"description": "Malformed request (body or parameter)"}
                responses["400"].update(_ERROR)
    spec.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    spec.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    return spec
