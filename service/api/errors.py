"""Every error of the HTTP protocols, in one exception handler with two renderers chosen by path.

Domain errors (:mod:`service.errors`) are mapped to a status here and nowhere else. Under ``/v2`` (the Open
Inference Protocol) an error is answered as the protocol's ``{"error": "<message>"}``; everywhere else as
RFC 9457 problem+json (``type``, ``title``, ``status``, ``detail``, and ``errors`` naming the fields). The
limits middleware, which answers before the application runs, renders through the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service import errors

logger = logging.getLogger("calibserve.api")

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://calibserve.dev/problems/"
OIP_PREFIX = "/v2"

# Most specific first: the first class an error is an instance of decides its status.
STATUS_OF: tuple[tuple[type[errors.CalibserveError], int, str], ...] = (
    (errors.NotFitted, 400, "not-fitted"),
    (errors.InvalidParameter, 422, "validation"),
    (errors.InvalidInput, 400, "invalid-input"),
    (errors.Unauthenticated, 401, "unauthorized"),
    (errors.PermissionDenied, 403, "forbidden"),
    (errors.NotFound, 404, "not-found"),
    (errors.NotAcceptable, 406, "not-acceptable"),
    (errors.RequestTimeout, 408, "request-timeout"),
    (errors.Conflict, 409, "conflict"),
    (errors.PayloadTooLarge, 413, "content-too-large"),
    (errors.UnsupportedMediaType, 415, "unsupported-media-type"),
    (errors.HeadersTooLarge, 431, "request-header-fields-too-large"),
    (errors.UpstreamTimeout, 504, "upstream-timeout"),
    (errors.UpstreamFailed, 502, "upstream-failed"),
    (errors.UpstreamUnavailable, 503, "upstream-unavailable"),
    (errors.UpstreamRejected, 400, "upstream-rejected"),  # the upstream's own 4xx status: see status_of
    (errors.ModelTimeout, 504, "model-timeout"),
    (errors.ModelFailed, 502, "model-failed"),
    (errors.WorkTimeout, 504, "work-timeout"),
    (errors.MissingDependency, 501, "missing-dependency"),
    (errors.WorkCancelled, 503, "work-cancelled"),
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
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class HTTPError:
    """An error as the HTTP protocols see it, before one of the renderers writes it."""

    status: int
    detail: str
    kind: str | None = None
    field_errors: list[dict[str, Any]] | None = None
    headers: dict[str, str] | None = None


def status_of(exc: errors.CalibserveError) -> tuple[int, str]:
    if isinstance(exc, errors.UpstreamRejected) and 400 <= exc.upstream_status < 500:
        return exc.upstream_status, "upstream-rejected"
    for cls, status, kind in STATUS_OF:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal"


def from_domain(exc: errors.CalibserveError) -> HTTPError:
    status, kind = status_of(exc)
    field_errors = exc.details
    if field_errors is None and exc.field is not None:
        entry: dict[str, Any] = {"field": exc.field, "message": exc.message}
        if exc.row is not None:
            entry["row"] = exc.row
        field_errors = [entry]
    headers = None
    if status == 503:
        headers = {"Retry-After": "1"}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return HTTPError(status, exc.message, kind, field_errors, headers)


def from_validation(exc: RequestValidationError) -> HTTPError:
    field_errors = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field_errors.append({"field": ".".join(location) or "body", "message": error.get("msg", "invalid")})
    first = field_errors[0] if field_errors else {"field": "body", "message": "invalid"}
    return HTTPError(422, f"{first['field']}: {first['message']}", "validation", field_errors)


def from_exception(exc: Exception) -> HTTPError | None:
    """The HTTP form of an error raised by a route, a parser or the framework; None for a bug."""
    if isinstance(exc, errors.CalibserveError):
        return from_domain(exc)
    if isinstance(exc, RequestValidationError):
        return from_validation(exc)
    if isinstance(exc, ClientDisconnect):  # nobody reads the answer; no traceback for it either
        return HTTPError(
            400, "the client disconnected before sending the whole request body", "invalid-input"
        )
    if isinstance(exc, StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {}) or None
        return HTTPError(exc.status_code, str(exc.detail), headers=headers)
    return None


# ------------------------------------------------------------------------------------------- renderers


def problem_body(error: HTTPError) -> bytes:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (error.kind or TITLES.get(error.status, "error").lower().replace(" ", "-")),
        "title": TITLES.get(error.status, "Error"),
        "status": error.status,
        "detail": error.detail,
    }
    if error.field_errors:
        body["errors"] = error.field_errors
    return orjson.dumps(body)


def oip_body(error: HTTPError) -> bytes:
    return orjson.dumps({"error": error.detail})


def is_oip_path(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def rendered(path: str, error: HTTPError) -> tuple[int, bytes, str, dict[str, str]]:
    """``(status, body, media type, headers)`` of ``error`` in the format of the protocol at ``path``."""
    status = error.status
    if is_oip_path(path):
        # The Open Inference Protocol knows one status for every malformed request.
        return (
            400 if status == 422 else status,
            oip_body(error),
            "application/json",
            dict(error.headers or {}),
        )
    return status, problem_body(error), PROBLEM_CONTENT_TYPE, dict(error.headers or {})


def render(path: str, error: HTTPError) -> Response:
    status, body, media_type, headers = rendered(path, error)
    return Response(body, status_code=status, media_type=media_type, headers=headers or None)


def problem(status: int, detail: str, *, kind: str | None = None) -> Response:
    """A problem+json answer built by a route itself (health)."""
    return render("/", HTTPError(status, detail, kind))


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
    """Register the one exception handler for every error a route, a parser or the framework raises."""

    async def handle(request: Request, exc: Exception) -> Response:
        error = from_exception(exc)
        if error is None:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            error = HTTPError(500, "internal error; the server log has the details", "internal")
        elif error.status == 405:
            # Starlette names the methods of the first route that matched the path only; several routes
            # share most paths here (GET, PUT and DELETE /v1/models/{name}), so list them all.
            error = HTTPError(
                405,
                error.detail,
                headers={"Allow": ", ".join(allowed_methods(request.app, request.url.path))},
            )
        return render(request.url.path, error)

    for exception_class in (
        errors.CalibserveError,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(exception_class, handle)
