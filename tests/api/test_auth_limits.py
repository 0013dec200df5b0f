"""API keys (walking the route table), body-size and concurrency limits."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.api import create_app
from service.api.limits import ConcurrencyLimitMiddleware
from service.config import Settings
from tests.helpers.problems import assert_problem

KEYS = "adm-secret:admin,rd-secret:read"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
READ_WRITES = {
    "/v1/models/{name}/calibrate",
    "/v1/models/{name}/predict",
    "/v1/models/{name}/evaluate",
    "/v1/models/{name}/evaluate/diagram",
    "/v1/metrics",
}


def protected_routes(app):
    """Every operation of the OpenAPI document (the route table as users see it) outside the open ones."""
    for path, operations in app.openapi()["paths"].items():
        if path in PUBLIC or path.startswith("/v2"):  # OIP answers {"error"}: tests/api/test_oip.py
            continue
        for method in operations:
            method = method.upper()
            concrete = path.replace("{name}", "digits-mlp").replace("{version}", "1")
            needs_admin = method in {"PUT", "DELETE"} or (method == "POST" and path not in READ_WRITES)
            yield method, concrete, needs_admin


def test_every_protected_route_needs_a_key_with_the_right_role(make_client):
    client = make_client(api_keys=KEYS)
    routes = list(protected_routes(client.app))
    assert len(routes) >= 15
    for method, path, needs_admin in routes:
        assert_problem(client.request(method, path), 401)
        assert_problem(client.request(method, path, headers={"X-API-Key": "wrong"}), 401)
        read = client.request(method, path, headers={"X-API-Key": "rd-secret"})
        if needs_admin:
            assert_problem(read, 403, "admin")
        else:
            assert read.status_code not in (401, 403), (method, path, read.text)
        admin = client.request(method, path, headers={"Authorization": "Bearer adm-secret"})
        assert admin.status_code not in (401, 403), (method, path, admin.text)
    assert client.get("/healthz").status_code == 200


def test_non_local_bind_needs_keys_or_explicit_off():
    with pytest.raises(ValueError, match="without API keys"):
        Settings(host="0.0.0.0").check_bind_is_safe()
    Settings(host="0.0.0.0", auth="off").check_bind_is_safe()
    Settings(host="0.0.0.0", api_keys="k:admin").check_bind_is_safe()
    Settings(host="127.0.0.1").check_bind_is_safe()
    with pytest.raises(ValueError):
        Settings(api_keys="k:superuser")


def test_body_over_the_limit_is_413_with_and_without_content_length(make_client):
    client = make_client(max_body_bytes=4096)
    client.put("/v1/models/m", json={"num_classes": 2})
    big = b'{"logits": [' + b"[0.5, 0.5]," * 2000 + b"[0.5, 0.5]]}"
    assert_problem(client.post("/v1/models/m/calibrate", content=big), 413, "4096")

    def chunks():
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    assert_problem(client.post("/v1/models/m/calibrate", content=chunks()), 413)
    small = client.post("/v1/models/m/calibrate", json={"logits": [[0.5, 0.5]]})
    assert small.status_code == 200


def test_concurrency_limit_answers_503_at_once(tmp_path, models_dir):
    app = create_app(Settings(store_dir=tmp_path / "s", models_dir=models_dir, max_concurrency=2))
    configured = [m for m in app.user_middleware if m.cls is ConcurrencyLimitMiddleware]
    assert configured and configured[0].kwargs == {"max_concurrency": 2}
    release = asyncio.Event()

    async def slow(scope, receive, send):  # a long request held open until released
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    limiter = ConcurrencyLimitMiddleware(slow, max_concurrency=2)

    async def scenario():
        transport = httpx.ASGITransport(app=limiter)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            waiting = [asyncio.create_task(http.get("/x")) for _ in range(2)]
            while limiter.in_flight < 2:
                await asyncio.sleep(0.001)
            refused = await http.get("/x")
            release.set()
            done = await asyncio.gather(*waiting)
            after = await http.get("/x")
            return refused, done, after

    refused, done, after = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "CALIBSERVE_MAX_CONCURRENCY" in refused.json()["detail"]
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert limiter.in_flight == 0
