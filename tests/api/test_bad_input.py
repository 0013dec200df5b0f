"""Every bad input of DESIGN.md and the numerical core answers a 4xx problem+json naming the problem."""

from __future__ import annotations

import pytest

from tests.helpers.problems import assert_problem

GOOD = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]]


@pytest.fixture
def three(client):
    assert client.put("/v1/models/three", json={"num_classes": 3}).status_code == 201
    return client


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        ({"logits": [[1.0, float("nan"), 0.0]]}, 400, ("NaN", "row 0")),
        ({"logits": [1.0, 2.0, 3.0]}, 400, ("2-D",)),
        ({"logits": [[1.0, 2.0], [3.0]]}, 400, ("rectangular",)),
        ({"logits": []}, 400, ("logits",)),
        ({"logits": [[]]}, 400, ("logits",)),
        ({"logits": [["a", "b", "c"]]}, 400, ("numbers",)),
        ({"logits": [[1.0, 2.0]]}, 400, ("3 classes", "2 columns")),
        ({"probabilities": [[0.5, 0.2, 0.2]]}, 400, ("sums to",)),
        ({"probabilities": [[1.5, -0.5, 0.0]]}, 400, ("[0, 1]",)),
        ({}, 400, ("exactly one",)),
        ({"logits": GOOD, "probabilities": GOOD}, 400, ("exactly one",)),
        ({"logits": GOOD, "extra": 1}, 422, ("extra",)),
    ],
)
def test_calibrate_bad_input(three, body, status, needles):
    if body.get("logits") and isinstance(body["logits"][0], list) and "NaN" in needles:
        response = three.post(
            "/v1/models/three/calibrate",
            content=b'{"logits": [[1.0, NaN, 0.0]]}',
            headers={"content-type": "application/json"},
        )
        # orjson refuses the NaN token (it is not JSON): still a 400 naming the body
        assert_problem(response, 400)
        response = three.post("/v1/models/three/calibrate", content=b'{"logits": [[1.0, 1e400, 0.0]]}')
        assert_problem(response, 400, "infinity")
        return
    assert_problem(three.post("/v1/models/three/calibrate", json=body), status, *needles)


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"logits": GOOD, "labels": [0]}, ("1 entries", "2 rows")),
        ({"logits": GOOD, "labels": [0, 3]}, ("labels[1] = 3", "[0, 3)")),
        ({"logits": GOOD, "labels": [0, -1]}, ("labels[1]",)),
        ({"logits": GOOD, "labels": [0, 1.5]}, ("not an integer",)),
        ({"logits": GOOD, "labels": [0, 1], "method": "magic"}, ("method",)),
        ({"logits": GOOD, "labels": [0, 1], "options": {"bogus": 1}}, ("bogus",)),
        ({"logits": GOOD, "labels": [0, 1], "sample_weight": [1.0, -1.0]}, ("sample_weight",)),
    ],
)
def test_fit_bad_input(three, body, needles):
    response = three.post("/v1/models/three/fit", json=body)
    assert response.status_code in (400, 422), response.text
    assert_problem(response, response.status_code, *needles)
    assert three.get("/v1/models/three/calibrators").json()["items"] == []


def test_unknown_model_and_version(client):
    assert_problem(client.post("/v1/models/ghost/calibrate", json={"logits": GOOD}), 404, "ghost")
    assert_problem(client.post("/v1/models/ghost/fit", json={"logits": GOOD, "labels": [0, 1]}), 404)
    client.put("/v1/models/three", json={"num_classes": 3})
    response = client.post("/v1/models/three/calibrate", json={"logits": GOOD}, params={"version": 7})
    assert_problem(response, 404)
    assert (
        client.post("/v1/models/three/calibrate", json={"logits": GOOD}, params={"version": 0}).status_code
        == 422
    )


def test_huge_logits_do_not_produce_nan(three):
    body = three.post("/v1/models/three/calibrate", json={"logits": [[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]})
    assert body.status_code == 200
    assert body.json()["probabilities"][0] == [1.0, 0.0, 0.0]
    fitted = three.post(
        "/v1/models/three/fit", json={"logits": [[1e4, -1e4, 0.0], [0.0, 1e4, -1e4]], "labels": [0, 1]}
    )
    assert fitted.status_code == 201, fitted.text


def test_logits_only_model_cannot_predict(three):
    assert_problem(three.post("/v1/models/three/predict", json={"inputs": [[1.0] * 3]}), 400, "logits-only")


def test_not_json_and_empty_bodies(three):
    assert_problem(three.post("/v1/models/three/calibrate", content=b""), 400, "empty")
    assert_problem(three.post("/v1/models/three/calibrate", content=b"\xff\xfe"), 400, "JSON")


@pytest.mark.parametrize(
    ("method", "url", "parameter"),
    [
        ("GET", "/v1/models?cursor=a&cursor=b", "cursor"),
        ("GET", "/v1/models?limit=1&limit=2", "limit"),
        ("POST", "/v1/models/three/calibrate?version=1&version=2", "version"),
    ],
    ids=["cursor", "limit", "version"],
)
def test_a_repeated_query_parameter_is_422_naming_it(three, method, url, parameter):
    # found by the fuzz test: the last (or first) value won silently and the answer was 200. Both versions
    # exist, so that either value alone would be served: only the repetition is wrong.
    for _ in range(2):
        fitted = three.post("/v1/models/three/fit", json={"logits": GOOD, "labels": [0, 1]})
        assert fitted.status_code == 201, fitted.text
    response = three.request(method, url, json={"logits": GOOD} if method == "POST" else None)
    body = assert_problem(response, 422)
    assert parameter in body["detail"] or parameter in str(body.get("errors")), body
