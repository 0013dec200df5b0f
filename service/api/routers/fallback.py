"""Paths under /v1/models that match no route: a malformed model name is 400, anything else 404.

The router decodes ``%2F`` before matching, so ``/v1/models/a%2Fb`` would otherwise be an anonymous 404;
DESIGN promises 400 for names with separators, so the raw path decides which it was.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import APIRouter, Request

from service.errors import NotFound
from service.store import validate_model_name

router = APIRouter(include_in_schema=False)

PREFIX = b"/v1/models/"


@router.api_route("/v1/models/{rest:path}", methods=["GET", "PUT", "POST", "DELETE", "PATCH"])
async def unmatched_model_path(request: Request) -> None:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    segment = raw[len(PREFIX) :].split(b"?", 1)[0].split(b"/", 1)[0] if raw.startswith(PREFIX) else b""
    validate_model_name(unquote(segment.decode("latin-1")))
    raise NotFound(f"no route matches {request.method} on this path")
