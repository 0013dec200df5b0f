"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) from files shipped in the package, not from a CDN.

FastAPI's own pages load their scripts from jsdelivr, so on a machine without internet access (a cluster,
an air-gapped site) they were blank. The minified assets are vendored under ``static/docs`` (versions,
hashes and licences in its ``LICENSES.md``) and served at ``/docs/static/``; the pages reference nothing
outside the service (the favicon is an empty ``data:`` URI, ReDoc's Google fonts are off).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "static" / "docs"
ASSETS_PATH = "/docs/static"
NO_FAVICON = "data:,"


def install(app: FastAPI) -> None:
    """Serve the two documentation pages and their assets (``app`` is built with ``docs_url=None``)."""
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    # a Mount, not a route: public like the pages, and outside the route table and the OpenAPI document
    app.router.routes.append(Mount(ASSETS_PATH, app=StaticFiles(directory=ASSETS), name="docs-assets"))

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + redirect_url,
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=NO_FAVICON,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=NO_FAVICON,
            with_google_fonts=False,
        )
