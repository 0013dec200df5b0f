"""Paths under /v1/models that no route answers: a malformed model name is 400, a method that the path
does not serve 405 (with every method it does serve in ``Allow``), anything else 404.

The router decodes ``%2F`` before matching, so ``/v1/models/a%2Fb`` would otherwise be an anonymous 404;
DESIGN promises 400 for names with separators, so the raw path decides which it was. A method the path does
not serve reaches this catch-all too (its own routes match the path only partially), hence the 405 here.
The Open Inference Protocol router ends with a catch-all of its own that makes the same decision
(:func:`check_unmatched`) and answers it in the protocol's ``{"error": ...}`` format.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response

from service.api.errors import allowed_methods
from service.errors import NotFound
from service.names import validate_model_name

router = APIRouter(include_in_schema=False)

PREFIX = b"/v1/models/"


METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]


def check_unmatched(request: Request, prefix: bytes) -> Response:
    """What an unmatched path deserves: InvalidInput for a bad model name right after ``prefix`` (in the
    raw, undecoded path); a 307 to the path without its trailing slash where that one is served (the
    catch-all would otherwise pre-empt Starlette's own redirect); 405 for a method that the path does not
    serve; else NotFound. Everything but the redirect is raised."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    if raw.startswith(prefix):
        validate_model_name(unquote(raw[len(prefix) :].split(b"?", 1)[0].split(b"/", 1)[0].decode("latin-1")))
    path = request.url.path
    if path.endswith("/") and allowed_methods(request.app, path.rstrip("/")):
        return RedirectResponse(request.url.replace(path=path.rstrip("/")), status_code=307)
    methods = allowed_methods(request.app, path)
    if methods:
        raise HTTPException(
            405, f"{request.method} is not allowed on this path", {"Allow": ", ".join(methods)}
        )
    raise NotFound(f"no route matches {request.method} on this path")


@router.api_route("/v1/models/{rest:path}", methods=METHODS)
async def unmatched_model_path(request: Request) -> Response:
    return check_unmatched(request, PREFIX)
