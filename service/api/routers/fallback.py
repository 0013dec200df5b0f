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

from service.api.problems import allowed_methods
from service.errors import NotFound
from service.store import validate_model_name

router = APIRouter(include_in_schema=False)

PREFIX = b"/v1/models/"


METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH"]


def check_unmatched(request: Request, prefix: bytes) -> None:
    """Raise what an unmatched path deserves: InvalidInput for a bad model name right after ``prefix`` (in
    the raw, undecoded path), 405 for a method that the path does not serve, else NotFound."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    if raw.startswith(prefix):
        validate_model_name(unquote(raw[len(prefix) :].split(b"?", 1)[0].split(b"/", 1)[0].decode("latin-1")))
    methods = allowed_methods(request.app, request.url.path)
    if methods:
        raise HTTPException(
            405, f"{request.method} is not allowed on this path", {"Allow": ", ".join(methods)}
        )
    raise NotFound(f"no route matches {request.method} on this path")


@router.api_route("/v1/models/{rest:path}", methods=METHODS)
async def unmatched_model_path(request: Request) -> None:
    check_unmatched(request, PREFIX)
