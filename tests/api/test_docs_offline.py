"""``/docs`` and ``/redoc`` load their scripts from the package, so they work offline (issue #11: they came
from a CDN and were blank without internet access)."""

from __future__ import annotations

import re

import pytest

from service.api.docs import ASSETS


def references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + re.findall(
        r"""url:\s*'([^']+)'""", html
    )


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_reference_only_local_paths(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "cdn." not in html and "jsdelivr" not in html and "googleapis" not in html
    found = references(html)
    assert found, html
    for url in found:
        assert url.startswith("/") or url.startswith("data:"), url
    for url in found:
        if url.startswith("/docs/static/") or url == "/openapi.json":
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url


def test_assets_are_served_with_their_types(client):
    expected = {
        "swagger-ui-bundle.js": "javascript",
        "swagger-ui.css": "text/css",
        "redoc.standalone.js": "javascript",
    }
    for name, kind in expected.items():
        response = client.get(f"/docs/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
        assert response.content == (ASSETS / name).read_bytes()
    assert client.get("/docs/static/../../app.py").status_code == 404
    assert client.get("/docs/static/missing.js").status_code == 404
    assert (ASSETS / "LICENSES.md").is_file()


def test_oauth2_redirect_and_openapi_stay(client):
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert "/docs" not in client.get("/openapi.json").json()["paths"]


def test_assets_are_public_with_auth_on(make_client):
    client = make_client(api_keys="k:admin")
    assert client.get("/docs").status_code == 200
    assert client.get("/docs/static/swagger-ui.css").status_code == 200
