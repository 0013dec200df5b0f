"""Labelled sets on the wire (fit, evaluate, ``/v1/metrics``): a JSON object, or an ``.npz`` archive.

``application/json`` (default)
    The body model's fields, arrays as nested lists.
``application/x-npz``
    The arrays as an ``.npz`` archive (``np.savez``): ``logits``, ``probabilities`` or ``inputs``, ``labels``,
    and optionally ``sample_weight``; the scalar fields as query parameters (``?method=temperature&
    activate=false&options={"max_iter":100}`` for a fit, ``options`` as JSON text). A 50,000 x 1,000 float32
    set is 200 MB this way, against about 1 GB of JSON, and it is read without parsing a number.

Both end in the same body model, so a field is validated, and its problem worded, the same way whichever
format carried it.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import Request
from pydantic import BaseModel

from service.api import tensors
from service.api.bodies import parse_object, validate_object
from service.errors import InvalidParameter

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_labelled(
    request: Request, model: type[ModelT], *, route_parameters: tuple[str, ...] = ()
) -> ModelT:
    """The body of a labelled route as ``model``; ``route_parameters`` are query parameters the route itself
    declares (``version``), which are not body fields."""
    kind = tensors.body_type(request.headers.get("content-type"), (tensors.JSON, tensors.NPZ))
    body = await _whole_body(request)
    if kind != tensors.NPZ:
        return validate_object(parse_object(body), model)
    data: dict[str, Any] = {}
    for key, value in parse_qsl(
        request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
    ):
        if key in route_parameters:
            continue
        if key in ("options", "conformal"):  # JSON objects
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise InvalidParameter(f"{key}: not valid JSON: {exc}", field=key) from None
        data[key] = _query_scalar(model, key, value)
    data.update(tensors.decode_npz(body, max_bytes=request.app.state.settings.max_body_bytes))
    return validate_object(data, model)


async def _whole_body(request: Request) -> bytes:
    """``request.body()`` without its copy of a body that came in one piece: Starlette joins the chunks
    with the stream's closing empty one, which copied a 48 MB fit body (~14 ms) for nothing."""
    chunks = [chunk async for chunk in request.stream() if chunk]
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # what request.body() caches, for any later reader
    return body


_BOOLEANS = {"true": True, "false": False}
_INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")
_FLOAT = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


def _query_scalar(model: type[BaseModel], key: str, value: Any) -> Any:
    """A query-string value as its field's type, where the text is unambiguous: ``true``/``false`` for a
    boolean field, digits for an integer field. Anything else stays text, and the body model (strict) words
    the problem as it does for JSON."""
    field = model.model_fields.get(key)
    if field is None or not isinstance(value, str):
        return value
    annotation = field.annotation
    if annotation is bool and value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    if annotation is int and _INTEGER.match(value):
        return int(value)
    if annotation in (float, float | None) and _FLOAT.match(value):
        return float(value)
    return value


def labelled_bodies(model: type[BaseModel]) -> dict[str, Any]:
    """The ``.npz`` request body of ``model``'s route, for the OpenAPI document."""
    arrays = [
        name
        for name in ("logits", "probabilities", "inputs", "labels", "sample_weight")
        if name in model.model_fields
    ]
    scalars = [name for name in model.model_fields if name not in arrays and name != "upstream_inputs"]
    return {
        tensors.NPZ: {
            "schema": {"type": "string", "format": "binary"},
            "description": f"an .npz archive of {', '.join(arrays)}; the other fields ({', '.join(scalars)}) "
            "as query parameters",
        }
    }
