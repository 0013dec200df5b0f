"""Errors as RFC 9457 problem+json: the one place that maps domain errors to HTTP status codes."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service import errors

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


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(errors.CalibserveError)
    async def _domain(request: Request, exc: errors.CalibserveError) -> Response:
        return domain_problem(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return validation_problem(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal error; the server log has the details", kind="internal")
