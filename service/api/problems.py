"""Errors as RFC 9457 problem+json: the one place that maps domain errors to HTTP status codes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service import errors
from service.store import MODEL_NAME_PATTERN

logger = logging.getLogger("calibserve.api")

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://calibserve.dev/problems/"

# Most specific first: the first class an error is an instance of decides its status.
STATUS_OF: tuple[tuple[type[errors.CalibserveError], int, str], ...] = (
    (errors.NotFitted, 400, "not-fitted"),
    (errors.InvalidInput, 400, "invalid-input"),
    (errors.NotFound, 404, "not-found"),
    (errors.Conflict, 409, "conflict"),
    (errors.ModelFailed, 502, "model-failed"),
    (errors.StoreUnavailable, 503, "store-unavailable"),
    (errors.NotReady, 503, "not-ready"),
    (errors.Overloaded, 503, "overloaded"),
)

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def problem_body(status: int, detail: str, *, kind: str | None = None, errors_: list | None = None) -> bytes:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (kind or TITLES.get(status, "error").lower().replace(" ", "-")),
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors_:
        body["errors"] = errors_
    return orjson.dumps(body)


def problem(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    errors_: list | None = None,
    headers: dict | None = None,
) -> Response:
    return Response(
        problem_body(status, detail, kind=kind, errors_=errors_),
        status_code=status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def status_of(exc: errors.CalibserveError) -> tuple[int, str]:
    for cls, status, kind in STATUS_OF:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal"


def domain_problem(exc: errors.CalibserveError) -> Response:
    status, kind = status_of(exc)
    field_errors = None
    if exc.field is not None:
        entry: dict[str, Any] = {"field": exc.field, "message": exc.message}
        if exc.row is not None:
            entry["row"] = exc.row
        field_errors = [entry]
    headers = {"Retry-After": "1"} if status == 503 else None
    return problem(status, exc.message, kind=kind, errors_=field_errors, headers=headers)


def validation_problem(exc: RequestValidationError) -> Response:
    field_errors = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field_errors.append({"field": ".".join(location) or "body", "message": error.get("msg", "invalid")})
    first = field_errors[0] if field_errors else {"field": "body", "message": "invalid"}
    return problem(422, f"{first['field']}: {first['message']}", kind="validation", errors_=field_errors)


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
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = _PROBLEM_CONTENT
            for parameter in parameters:
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"] = {**parameter.get("schema", {}), **_NAME_SCHEMA}
    return schema


def _routes(routes: Any) -> Iterator[Any]:
    """Every concrete route, out of included routers too (FastAPI wraps those in per-include contexts)."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            for context in contexts():
                yield context.starlette_route or context.original_route
        elif hasattr(route, "routes") and not hasattr(route, "path_regex"):
            yield from _routes(route.routes)
        else:
            yield route


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods some route serves on ``path``; catch-all routes (``{...:path}``) do not count."""
    methods: set[str] = set()
    for route in _routes(app.router.routes):
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is None or not route_methods or ":path}" in getattr(route, "path", ""):
            continue
        if regex.match(path):
            methods |= set(route_methods)
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json, and document them in the OpenAPI."""

    @app.exception_handler(errors.CalibserveError)
    async def _domain(request: Request, exc: errors.CalibserveError) -> Response:
        return domain_problem(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return validation_problem(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path only; several routes
            # share most paths here (GET, PUT and DELETE /v1/models/{name}), so list them all.
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
        return problem(exc.status_code, str(exc.detail), headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal error; the server log has the details", kind="internal")

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
