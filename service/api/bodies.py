"""Request and response bodies: orjson straight into numpy, without per-float pydantic validation.

Routes take the raw request, parse it with orjson, and check the small fields with a pydantic model whose
array fields are typed ``Any`` (the core's validation checks arrays as a whole, with row numbers). The
OpenAPI document still shows each body's schema through ``json_body(Model)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from service.errors import InvalidInput

ModelT = TypeVar("ModelT", bound=BaseModel)


class NumpyJSONResponse(Response):
    """JSON answer rendered by orjson, numpy arrays included."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def json_body(model: type[BaseModel], *, examples: dict[str, Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON request body that the route parses itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    media: dict[str, Any] = {"schema": schema}
    if examples:
        media["examples"] = {key: {"value": value} for key, value in examples.items()}
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


async def read_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (orjson); 400 naming the problem otherwise."""
    body = await request.body()
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object", field="body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object", field="body")
    return data


async def read_json(request: Request, model: type[ModelT]) -> ModelT:
    data = await read_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


def array(values: Any, name: str) -> np.ndarray:
    """A JSON array as numpy; ragged or non-numeric arrays are refused by the core's validation later."""
    if values is None:
        raise InvalidInput(f"{name} is required", field=name)
    try:
        return np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidInput(f"{name} must be a rectangular array of numbers", field=name) from None
