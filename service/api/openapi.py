"""The OpenAPI document: FastAPI's, plus the operations of the hot-path routes, plus the errors as sent.

The hot paths (calibrate, predict, OIP infer) are plain ASGI routes (:class:`~service.api.bodies.LeanRoute`)
that FastAPI cannot describe; their operations are declared here, on a router that is never served, with
the same decorators as every other route, so the document shows them exactly like the rest.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from service.api import tensors
from service.api.auth import ReadAccess
from service.api.bodies import json_body
from service.api.deps import ModelName, PinnedVersion, Version
from service.api.errors import PROBLEM_CONTENT_TYPE
from service.api.routers.oip import _ERRORS, DATATYPES, HEADER_LENGTH, INPUT_NAMES, OUTPUT_NAMES
from service.api.schemas import CalibrateRequest, PredictRequest
from service.names import MODEL_NAME_PATTERN

_TENSOR_SCHEMA = {"type": "string", "format": "binary"}
_TENSOR_HEADERS = [
    {
        "name": tensors.NAME_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "binary bodies: which array the body is (logits by default; inputs for /predict)",
    },
    {
        "name": tensors.SHAPE_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"},
        "description": "application/octet-stream bodies: the shape, e.g. 64,1000",
    },
    {
        "name": tensors.DTYPE_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "enum": list(tensors.RAW_DTYPES)},
        "description": "application/octet-stream bodies: the element type (float32 by default)",
    },
]
_BINARY_BODIES = {
    tensors.NPY: {"schema": _TENSOR_SCHEMA},
    tensors.RAW: {"schema": _TENSOR_SCHEMA},
}
_ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "predicted_class": {"type": "array", "items": {"type": "integer"}},
        "predicted_label": {"type": "array", "items": {"type": "string"}},
        "calibrator_version": {"type": ["integer", "null"]},
        "logits": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "probability_intervals": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "description": "[p0, p1] per row and class, when intervals were asked for (venn_abers)",
        },
    },
    "required": ["probabilities", "predicted_class", "calibrator_version"],
}
_ANSWERS = {
    200: {
        "description": "calibrated probabilities (JSON document, or a tensor with X-Tensor-* headers)",
        "content": {
            tensors.JSON: {"schema": _ANSWER_SCHEMA},
            tensors.NPY: {"schema": _TENSOR_SCHEMA},
            tensors.RAW: {"schema": _TENSOR_SCHEMA},
        },
    },
    406: {"description": "Accept names no type this route answers"},
    415: {"description": "unsupported Content-Type"},
}


def _tensor_body(model, examples=None) -> dict[str, Any]:
    extra = json_body(model, examples=examples, other_content=_BINARY_BODIES)
    extra["parameters"] = _TENSOR_HEADERS
    return extra


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(INPUT_NAMES)},
                                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                    "datatype": {"type": "string", "enum": list(DATATYPES)},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(OUTPUT_NAMES)},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                },
                "examples": {
                    "one row": {
                        "value": {
                            "id": "42",
                            "inputs": [
                                {
                                    "name": "logits",
                                    "shape": [1, 3],
                                    "datatype": "FP32",
                                    "data": [2.0, 0.5, -1.0],
                                }
                            ],
                        }
                    }
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"JSON header then tensor bytes; the header's length in {HEADER_LENGTH}",
            },
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "binary tensor data extension: length of the JSON header at the start of the body",
        }
    ],
}
_INFER_ANSWERS = {
    200: {
        "description": "the inference response (JSON, or JSON header then binary outputs)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **_ERRORS,
    502: {"description": 'a failing TorchScript model: {"error": "..."}'},
    504: {"description": 'a TorchScript model past CALIBSERVE_MODEL_TIMEOUT_S, or stalled: {"error": "..."}'},
}


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad input (problem+json)"},
    401: {"description": "missing or unknown API key"},
    403: {"description": "API key lacks the role, or a write from a foreign browser origin"},
    408: {"description": "headers or body too slow (CALIBSERVE_HEADER_TIMEOUT_S, CALIBSERVE_BODY_MIN_RATE)"},
    413: {"description": "body over CALIBSERVE_MAX_BODY_BYTES"},
    431: {"description": "request headers over CALIBSERVE_MAX_HEADER_BYTES"},
    503: {"description": "not ready, store not writable, or overloaded"},
}

# Declared for the document only: this router is never served (the LeanRoutes of the same paths are).
hot_paths = APIRouter(responses=COMMON_RESPONSES)


def _not_served() -> Response:
    raise NotImplementedError("documentation only; the LeanRoute of this path answers")


@hot_paths.post(
    "/v1/models/{name}/calibrate",
    tags=["inference"],
    dependencies=ReadAccess,
    summary="Calibrated probabilities for logits (or probabilities)",
    openapi_extra=_tensor_body(CalibrateRequest, examples={"one row": {"logits": [[2.0, 0.5, -1.0]]}}),
    response_class=Response,
    responses=_ANSWERS,
)
async def calibrate(
    name: ModelName,
    version: PinnedVersion = None,
    intervals: Annotated[
        bool | None,
        Query(description="answer probability_intervals, [p0, p1] per row and class (venn_abers; JSON only)"),
    ] = None,
) -> Response:
    return _not_served()


@hot_paths.post(
    "/v1/models/{name}/predict",
    tags=["inference"],
    dependencies=ReadAccess,
    summary="Run the TorchScript model on inputs and calibrate its logits",
    openapi_extra=_tensor_body(PredictRequest),
    response_class=Response,
    responses={
        **_ANSWERS,
        502: {"description": "the model raised or returned NaN / the wrong shape"},
        504: {"description": "the model ran past CALIBSERVE_MODEL_TIMEOUT_S, or is stalled"},
    },
)
async def predict(name: ModelName, version: PinnedVersion = None) -> Response:
    return _not_served()


@hot_paths.post(
    "/v2/models/{name}/infer",
    tags=["open inference protocol (v2)"],
    dependencies=ReadAccess,
    summary="Inference (Open Inference Protocol): calibrated probabilities",
    openapi_extra=_INFER_BODY,
    response_class=Response,
    responses=_INFER_ANSWERS,
)
async def infer(name: ModelName) -> Response:
    return _not_served()


@hot_paths.post(
    "/v2/models/{name}/versions/{version}/infer",
    tags=["open inference protocol (v2)"],
    dependencies=ReadAccess,
    summary="Inference with one calibrator version (Open Inference Protocol)",
    openapi_extra=_INFER_BODY,
    response_class=Response,
    responses=_INFER_ANSWERS,
)
async def infer_version(name: ModelName, version: Version) -> Response:
    return _not_served()


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                    "row": {"type": "integer"},
                },
            },
        },
    },
}
_PROBLEM_CONTENT = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
_MODEL_PATHS = ("/v1/models/{name}",)
_NAME_SCHEMA = {"type": "string", "pattern": MODEL_NAME_PATTERN, "maxLength": 64}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what the handlers above really send, for clients and fuzzers alike.

    On the v1 and health routes every error is problem+json (FastAPI documents its 422 as
    ``application/json`` ``HTTPValidationError``, which we never send); every route of a model can answer 404
    (unknown model or version); every route that parses a body or parameters can answer 422; and the
    ``{name}`` parameter carries the pattern the service enforces (a name outside it is a 400). The Open
    Inference Protocol routes under ``/v2`` keep their own ``{"error": ...}`` format and are left alone.
    """
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/v2"):
            continue
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            parameters = operation.get("parameters", [])
            if path.startswith(_MODEL_PATHS):
                responses.setdefault("404", {"description": "no such model (or calibrator version)"})
            if "requestBody" in operation or parameters:
                responses.setdefault("422", {"description": "a field or parameter fails validation"})
            if "requestBody" in operation:
                responses.setdefault("415", {"description": "a Content-Type this route does not read"})
            if path.startswith("/v1/") and not path.endswith("/export"):
                responses.setdefault("406", {"description": "Accept names no type this route answers"})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = _PROBLEM_CONTENT
            for parameter in parameters:
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"] = {**parameter.get("schema", {}), **_NAME_SCHEMA}
    return schema


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe every route, the hot paths included, with the errors as sent."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=[*app.routes, *hot_paths.routes],
            )
            app.openapi_schema = document_problems(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
