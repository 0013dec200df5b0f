"""The operator's console: ``/ui`` (models) and ``/ui/models/{name}`` (versions, diagrams, monitoring, actions).

The pages are a thin client of the v1 JSON routes: one HTML shell, and ES modules and a stylesheet shipped
under ``static/ui`` (no build step, no third-party code), which call the same routes as any client with
``fetch`` and send the API key as ``X-API-Key``. The server adds only what the pages need beside those
routes: the shell, its assets, and ``/ui/session`` (whether auth is on, and the role of the key the page
holds, so that buttons a read key may not use are disabled with the reason).

Every page is sent with a Content-Security-Policy that allows scripts, styles, and connections of the
service's own origin only (no inline script or style, no ``eval``), images from the origin and from ``blob:``
(the diagrams, fetched with the key and shown as object URLs), no frames, plugins or form posts. The scripts
write data into the page with ``textContent`` and attributes only, never as markup, so a class name such as
``<img src=x onerror=...>`` is shown as text.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from service.api.auth import presented_key
from service.config import role_of
from service.core.calibrators import METHODS

ASSETS = Path(__file__).parent / "static" / "ui"
ASSETS_PATH = "/ui/static"
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Assets(StaticFiles):
    """The console's scripts and stylesheet, with ``nosniff`` (a module script must be served as one)."""

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _shell(root: str) -> str:
    """The HTML shell, with the service's root path and the fit methods filled in (attribute-escaped)."""
    text = (ASSETS / "index.html").read_text(encoding="utf-8")
    return text.replace("__ROOT__", html.escape(root, quote=True)).replace(
        "__METHODS__", html.escape(",".join(METHODS), quote=True)
    )


def install(app: FastAPI) -> None:
    """Serve the console's pages, assets and session route (outside the OpenAPI document)."""
    app.router.routes.append(Mount(ASSETS_PATH, app=_Assets(directory=ASSETS), name="ui-assets"))

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(_shell(request.scope.get("root_path", "")), headers=PAGE_HEADERS)

    app.add_api_route("/ui", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/models/{name}", page, methods=["GET"], include_in_schema=False)

    @app.get("/ui/", include_in_schema=False)
    async def slash(request: Request) -> RedirectResponse:
        return RedirectResponse(request.scope.get("root_path", "") + "/ui", status_code=308)

    @app.get("/ui/session", include_in_schema=False)
    async def session(request: Request) -> JSONResponse:
        """Whether a key is needed, and the role of the key the page sent (None: none, or not valid).

        Always 200, so that the page asks without a failed request in the browser's console."""
        settings = request.app.state.settings
        key = presented_key(request.headers.get)
        role = role_of(key, settings.key_roles) if key and settings.auth_enabled else None
        return JSONResponse(
            {"auth": settings.auth_enabled, "role": role, "key_sent": key is not None},
            headers={"Cache-Control": "no-store"},
        )
