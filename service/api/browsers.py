"""Browsers: cross-origin writes are refused, and CORS is off unless origins are configured.

With auth off (the localhost default) any web page the user visits could otherwise change the service:
a form or a ``fetch`` without custom headers is sent cross-origin without a CORS preflight, so a page on
``http://evil.example`` could upload a calibrator with ``Content-Type: text/plain`` and activate it. Two
guards close this:

- every route with a body requires its own Content-Type (415 otherwise: :func:`tensors.body_type`), which
  rules out what a page can send without a preflight (``text/plain``, forms);
- :class:`CrossOriginGuard` answers 403 to any request that is not ``GET``, ``HEAD`` or ``OPTIONS`` and
  carries an ``Origin`` that is neither the service's own nor one of ``CALIBSERVE_CORS_ORIGINS``, or, with
  no ``Origin``, ``Sec-Fetch-Site: cross-site``. Clients that are not browsers send neither header and are
  not affected; the service's own pages (``/docs``) are same-origin.

``CALIBSERVE_CORS_ORIGINS`` (comma-separated, empty by default; ``*`` for any) switches on Starlette's
``CORSMiddleware`` for those origins, and lets them write too.
"""

from __future__ import annotations

from collections.abc import Collection

from service.api.limits import ASGIApp, Receive, Scope, Send, send_error
from service.errors import PermissionDenied

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What browsers may read of an answer besides the CORS-safelisted headers: the tensor headers and friends.
EXPOSED_HEADERS = [
    "X-Tensor-Name",
    "X-Tensor-Shape",
    "X-Tensor-Dtype",
    "X-Calibrator-Version",
    "X-Predicted-Class",
    "X-Store-View-Age",
    "Inference-Header-Content-Length",
    "Retry-After",
    "Content-Disposition",
]


def _own_origin(scope: Scope, headers: dict[bytes, bytes]) -> str | None:
    host = headers.get(b"host")
    if not host:
        return None
    return f"{scope.get('scheme', 'http')}://{host.decode('latin-1').lower()}"


class CrossOriginGuard:
    """403 for writes from a foreign browser origin (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, allowed_origins: Collection[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(origin.rstrip("/").lower() for origin in allowed_origins)
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin")
        refusal = None
        if origin is not None:
            text = origin.decode("latin-1").strip().rstrip("/").lower()
            if not (self.any or text in self.allowed or text == _own_origin(scope, headers)):
                refusal = (
                    f"cross-origin {scope.get('method')} from {text[:100]!r} is refused; allow the origin with "
                    "CALIBSERVE_CORS_ORIGINS"
                )
        elif headers.get(b"sec-fetch-site", b"").strip().lower() == b"cross-site":
            refusal = "cross-site requests that change the service are refused (Sec-Fetch-Site: cross-site)"
        if refusal is not None:
            await send_error(scope, send, PermissionDenied(refusal), close=True)
            return
        await self.app(scope, receive, send)


def cors_origins(value: str) -> list[str]:
    """``CALIBSERVE_CORS_ORIGINS`` as a list: comma-separated, blanks dropped."""
    return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
