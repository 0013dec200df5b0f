"""Browsers cannot change the service from another origin; Content-Types and Accept are enforced.

Found here (issue #11): with auth off (the localhost default), ``POST /v1/models/{name}/calibrators`` with
``Content-Type: text/plain`` and ``Origin: http://evil.example`` answered 201 and activated a temperature of
100, and ``POST .../activate`` (no body) worked cross-origin too. ``HEAD /healthz`` was 405, and
``evaluate`` with ``Accept: application/x-npy`` answered JSON instead of 406.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from tests.helpers.arrays import npz
from tests.helpers.problems import assert_problem

EVIL = "http://evil.example"
DOCUMENT = {"method": "temperature", "num_classes": 2, "params": {"temperature": 100.0}}


@pytest.fixture
def two(client):
    assert client.put("/v1/models/two", json={"num_classes": 2}).status_code == 201
    return client


def upload(client, document=None, **headers):
    return client.post(
        "/v1/models/two/calibrators",
        content=orjson.dumps(document or DOCUMENT),
        headers={"Content-Type": "application/json", **headers},
    )


def active_version(client):
    active = client.get("/v1/models/two").json()["active_calibrator"]
    return active and active["version"]


def test_the_reported_attack_is_refused(two):
    before = active_version(two)
    text_plain = upload(two, **{"Content-Type": "text/plain", "Origin": EVIL})
    assert text_plain.status_code in (403, 415)
    assert_problem(upload(two, **{"Content-Type": "text/plain"}), 415, "text/plain", "application/json")
    assert_problem(upload(two, Origin=EVIL), 403, "evil.example", "CALIBSERVE_CORS_ORIGINS")
    assert_problem(upload(two, **{"Sec-Fetch-Site": "cross-site"}), 403, "cross-site")
    assert active_version(two) == before


def test_cross_origin_writes_without_a_body_are_refused(two):
    version = upload(two).json()["version"]
    assert upload(two).json()["version"] == version + 1  # the newer one is active
    for method, path in [
        ("POST", f"/v1/models/two/calibrators/{version}/activate"),
        ("DELETE", f"/v1/models/two/calibrators/{version}"),
        ("DELETE", "/v1/models/two"),
        ("PUT", "/v1/models/three"),
        ("POST", "/v1/models/two/calibrate"),
        ("POST", "/v2/models/two/infer"),
    ]:
        for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            response = two.request(method, path, headers=headers)
            assert response.status_code == 403, (method, path, headers, response.text)
    assert two.get("/v1/models/three").status_code == 404
    assert active_version(two) == version + 1
    assert two.get(f"/v1/models/two/calibrators/{version}").status_code == 200


def test_reads_and_same_origin_writes_pass(two):
    assert two.get("/v1/models/two", headers={"Origin": EVIL}).status_code == 200
    assert two.head("/healthz", headers={"Origin": EVIL}).status_code == 200
    # the service's own pages (/docs) are same-origin: Origin is the Host the request was sent to
    own = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert upload(two, **own).status_code == 201
    assert upload(two, **{"Sec-Fetch-Site": "same-site"}).status_code == 201
    assert upload(two, **{"Sec-Fetch-Site": "none"}).status_code == 201  # typed into the address bar
    response = two.post("/v1/models/two/calibrate", json={"logits": [[1.0, 0.0]]}, headers=own)
    assert response.status_code == 200


def test_cors_is_off_by_default(two):
    preflight = two.options(
        "/v1/models/two/calibrate",
        headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    response = two.get("/v1/models/two", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in response.headers


def test_configured_origins_get_cors_and_may_write(make_client):
    app = "http://app.example"
    client = make_client(cors_origins=f"{app}, http://other.example/")
    assert client.put("/v1/models/two", json={"num_classes": 2}, headers={"Origin": app}).status_code == 201
    preflight = client.options(
        "/v1/models/two/calibrators",
        headers={
            "Origin": app,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == app
    created = upload(client, Origin=app, **{"Sec-Fetch-Site": "cross-site"})
    assert created.status_code == 201 and created.headers["access-control-allow-origin"] == app
    binary = client.post(
        "/v1/models/two/calibrate",
        content=np.zeros((1, 2), "<f4").tobytes(),
        headers={
            "Origin": "http://other.example",
            "Content-Type": "application/octet-stream",
            "X-Tensor-Shape": "1,2",
        },
    )
    assert binary.status_code == 200
    assert "X-Tensor-Shape" in binary.headers["access-control-expose-headers"]
    refused = upload(client, Origin=EVIL)
    assert_problem(refused, 403, "evil.example")
    assert "access-control-allow-origin" not in refused.headers


def test_any_origin_when_configured_so(make_client):
    client = make_client(cors_origins="*")
    response = client.put("/v1/models/two", json={"num_classes": 2}, headers={"Origin": EVIL})
    assert response.status_code == 201 and response.headers["access-control-allow-origin"] == "*"


FIT = {"logits": [[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]], "labels": [0, 1, 1, 0]}


@pytest.mark.parametrize(
    ("method", "path", "content", "wrong", "named"),
    [
        ("PUT", "/v1/models/m", orjson.dumps({"num_classes": 2}), "text/plain", "application/json"),
        (
            "POST",
            "/v1/models/two/calibrators",
            orjson.dumps(DOCUMENT),
            "application/x-www-form-urlencoded",
            "application/json",
        ),
        ("POST", "/v1/models/two/fit", orjson.dumps(FIT), "text/plain", "application/x-npz"),
        (
            "POST",
            "/v1/models/two/evaluate",
            orjson.dumps(FIT),
            "multipart/form-data; boundary=x",
            "application/x-npz",
        ),
        (
            "POST",
            "/v1/metrics",
            orjson.dumps({"probabilities": [[0.9, 0.1]], "labels": [0]}),
            "text/plain",
            "application/json",
        ),
        ("PUT", "/v1/models/up/torchscript", b"PK\x03\x04", "text/plain", "application/octet-stream"),
        ("PUT", "/v1/models/up/torchscript", b"PK\x03\x04", "application/json", "application/octet-stream"),
        (
            "POST",
            "/v1/models/two/calibrate",
            orjson.dumps({"logits": [[1.0, 0.0]]}),
            "text/plain",
            "application/json",
        ),
    ],
)
def test_every_body_needs_its_content_type(two, method, path, content, wrong, named):
    response = two.request(method, path, content=content, headers={"Content-Type": wrong})
    assert_problem(response, 415, wrong.split(";")[0], named)


def test_oip_infer_needs_json_in_its_format(two):
    body = orjson.dumps({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1, 0]}]})
    response = two.post("/v2/models/two/infer", content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "text/plain" in response.json()["error"]
    for content_type in ("application/json", "application/json; charset=utf-8", "application/octet-stream"):
        ok = two.post("/v2/models/two/infer", content=body, headers={"Content-Type": content_type})
        assert ok.status_code == 200, (content_type, ok.text)


def test_labelled_routes_take_json_and_npz(two):
    arrays = {key: np.asarray(value) for key, value in FIT.items()}
    as_npz = two.post("/v1/metrics", content=npz(**arrays), headers={"Content-Type": "application/x-npz"})
    as_json = two.post("/v1/metrics", json=FIT)
    assert as_npz.status_code == as_json.status_code == 200


def test_head_healthz_and_readyz(two):
    for path in ("/healthz", "/readyz"):
        response = two.head(path)
        assert response.status_code == 200 and response.content == b""
        assert int(response.headers["content-length"]) == len(two.get(path).content)


def test_json_only_routes_refuse_accept_they_cannot_satisfy(two):
    fitted = two.post("/v1/models/two/fit", json=FIT)
    assert fitted.status_code == 201, fitted.text
    cases = [
        ("POST", "/v1/models/two/evaluate", {"json": FIT}),
        ("POST", "/v1/metrics", {"json": FIT}),
        ("GET", "/v1/models/two", {}),
        ("GET", "/v1/models/two/calibrators", {}),
    ]
    for method, path, kwargs in cases:
        refused = two.request(method, path, headers={"Accept": "application/x-npy"}, **kwargs)
        assert_problem(refused, 406, "application/json")
        for accept in (
            "application/json",
            "*/*",
            "application/*",
            "application/x-npy, application/json;q=0.5",
        ):
            response = two.request(method, path, headers={"Accept": accept}, **kwargs)
            assert response.status_code == 200, (path, accept, response.text)
