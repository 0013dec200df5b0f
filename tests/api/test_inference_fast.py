"""The lean calibrate / predict routes: every content type, Accept negotiation, errors, auth, caching."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import softmax

from service.api import tensors
from tests.helpers.arrays import npy
from tests.helpers.data import DIGITS_LOGIT_ULPS
from tests.helpers.numerics import EPS32, assert_softmax_close
from tests.helpers.problems import assert_problem

ROWS = 64


@pytest.fixture
def fitted(client, cifar10):
    """A 10-class logits-only model with a temperature fitted on real CIFAR-10 logits."""
    assert client.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
    response = client.post(
        "/v1/models/wrn/fit",
        json={"logits": cifar10["logits_val"].tolist(), "labels": cifar10["labels_val"].tolist()},
    )
    assert response.status_code == 201, response.text
    return client, response.json()["temperature"], cifar10["logits_test"][:ROWS]


def decoded(response) -> np.ndarray:
    """The probabilities of an answer of any media type."""
    kind = response.headers["content-type"].split(";")[0]
    if kind == tensors.JSON:
        return np.asarray(response.json()["probabilities"])
    if kind == tensors.NPY:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    shape = tuple(int(size) for size in response.headers[tensors.SHAPE_HEADER].split(","))
    dtype = np.dtype("<" + {"float32": "f4", "float64": "f8"}[response.headers[tensors.DTYPE_HEADER]])
    return np.frombuffer(response.content, dtype=dtype).reshape(shape)


def requests_of(logits: np.ndarray) -> dict[str, dict]:
    """The same logits in each request media type (raw also as float64 and float16)."""
    shape = f"{logits.shape[0]},{logits.shape[1]}"
    return {
        "json": {"json": {"logits": logits.tolist()}},
        "npy": {"content": npy(logits), "headers": {"Content-Type": tensors.NPY}},
        "raw32": {
            "content": logits.astype("<f4").tobytes(),
            "headers": {"Content-Type": tensors.RAW, "X-Tensor-Shape": shape},
        },
        "raw64": {
            "content": logits.astype("<f8").tobytes(),
            "headers": {"Content-Type": tensors.RAW, "X-Tensor-Shape": shape, "X-Tensor-Dtype": "float64"},
        },
    }


@pytest.mark.parametrize("accept", [None, tensors.JSON, tensors.NPY, tensors.RAW])
@pytest.mark.parametrize("request_kind", ["json", "npy", "raw32", "raw64"])
def test_every_content_type_gives_the_same_probabilities(fitted, request_kind, accept):
    client, temperature, logits = fitted
    expected = softmax(logits.astype(np.float64) / temperature, axis=1)
    options = requests_of(logits)[request_kind]
    if accept is not None:
        options.setdefault("headers", {})["Accept"] = accept
    response = client.post("/v1/models/wrn/calibrate", **options)
    assert response.status_code == 200, response.text
    kind = response.headers["content-type"].split(";")[0]
    # without Accept the answer takes the request's type
    assert kind == accept or (
        accept is None and kind == {"json": tensors.JSON, "npy": tensors.NPY}.get(request_kind, tensors.RAW)
    )
    probabilities = decoded(response)
    assert probabilities.shape == expected.shape
    # computed in float64 from the same logits; binary answers to float32 requests are rounded to float32
    # (half an ulp, relative), float64 ones only differ by float64 rounding
    rtol = EPS32 if probabilities.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(probabilities, expected, rtol=rtol, atol=1e-15)
    if kind == tensors.JSON:
        body = response.json()
        assert body["calibrator_version"] == 1
        assert body["predicted_class"] == expected.argmax(axis=1).tolist()
    else:
        assert response.headers[tensors.VERSION_HEADER] == "1"
        assert response.headers[tensors.PREDICTED_HEADER] == ",".join(map(str, expected.argmax(axis=1)))
        assert response.headers[tensors.SHAPE_HEADER] == f"{ROWS},10"
        # binary answers are float64 only for float64 requests
        assert probabilities.dtype == (np.float64 if request_kind == "raw64" else np.float32)


def test_accept_quality_values_and_wildcards(fitted):
    client, _, logits = fitted
    options = requests_of(logits[:2])["json"]
    preferred = client.post(
        "/v1/models/wrn/calibrate", **options, headers={"Accept": "application/json;q=0.5, application/x-npy"}
    )
    assert preferred.headers["content-type"] == tensors.NPY
    wildcard = client.post("/v1/models/wrn/calibrate", **options, headers={"Accept": "text/html, */*;q=0.1"})
    assert wildcard.headers["content-type"].startswith(tensors.JSON)
    refused = client.post("/v1/models/wrn/calibrate", **options, headers={"Accept": "text/html"})
    assert_problem(refused, 406, "text/html")
    never = client.post("/v1/models/wrn/calibrate", **options, headers={"Accept": "application/x-npy;q=0"})
    assert_problem(never, 406)


def test_probabilities_as_a_binary_tensor(fitted):
    client, temperature, logits = fitted
    probabilities = softmax(logits.astype(np.float64), axis=1)
    response = client.post(
        "/v1/models/wrn/calibrate",
        content=npy(probabilities),
        headers={"Content-Type": tensors.NPY, "X-Tensor-Name": "probabilities", "Accept": tensors.JSON},
    )
    assert response.status_code == 200, response.text
    expected = softmax(np.log(probabilities) / temperature, axis=1)
    np.testing.assert_allclose(response.json()["probabilities"], expected, atol=1e-6)


def test_predict_with_binary_inputs_matches_json(client, digits):
    inputs = digits["test"]["inputs"][:20].astype(np.float32)
    as_json = client.post("/v1/models/digits-mlp/predict", json={"inputs": inputs.tolist()})
    as_npy = client.post(
        "/v1/models/digits-mlp/predict", content=npy(inputs), headers={"Content-Type": tensors.NPY}
    )
    as_raw = client.post(
        "/v1/models/digits-mlp/predict",
        content=inputs.tobytes(),
        headers={"Content-Type": tensors.RAW, "X-Tensor-Shape": "20,64", "Accept": tensors.JSON},
    )
    assert as_json.status_code == as_npy.status_code == as_raw.status_code == 200, as_npy.text
    logits = digits["test"]["logits"][:20]
    expected = softmax(logits.astype(np.float64), axis=1)
    for response in (as_json, as_npy, as_raw):  # this machine's forward pass against the stored logits
        assert_softmax_close(decoded(response), expected, logits, ulps=DIGITS_LOGIT_ULPS)
    assert as_npy.headers[tensors.VERSION_HEADER] == "none"
    ragged = client.post("/v1/models/digits-mlp/predict", json={"inputs": [[], [0.0]]})
    assert_problem(ragged, 400, "rectangular")  # found by fuzzing: was an unhandled ValueError (500)


NaN_ROW = np.array([[1.0, 2.0, 3.0], [0.0, np.nan, 1.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("headers", "content", "status", "needles"),
    [
        (
            {"Content-Type": tensors.RAW, "X-Tensor-Shape": "2,4"},
            np.zeros((2, 3), "<f4").tobytes(),
            400,
            ("24 bytes", "32"),
        ),
        ({"Content-Type": tensors.RAW}, np.zeros((2, 3), "<f4").tobytes(), 400, ("X-Tensor-Shape",)),
        ({"Content-Type": tensors.RAW, "X-Tensor-Shape": "2,x"}, b"", 400, ("X-Tensor-Shape",)),
        (
            {"Content-Type": tensors.RAW, "X-Tensor-Shape": "1,3", "X-Tensor-Dtype": "int8"},
            b"abc",
            400,
            ("int8",),
        ),
        ({"Content-Type": tensors.RAW, "X-Tensor-Shape": "2,3"}, NaN_ROW.tobytes(), 400, ("NaN", "row 1")),
        ({"Content-Type": tensors.RAW, "X-Tensor-Shape": "6"}, NaN_ROW.tobytes(), 400, ("2-D",)),
        (
            {"Content-Type": tensors.RAW, "X-Tensor-Shape": "3,2"},
            np.zeros((3, 2), "<f4").tobytes(),
            400,
            ("3 classes", "2 columns"),
        ),
        ({"Content-Type": tensors.NPY}, b"not numpy", 400, ("npy",)),
        ({"Content-Type": tensors.NPY}, npy(np.array([{"a": 1}], dtype=object)), 400, ("npy",)),
        ({"Content-Type": tensors.NPY}, npy(np.array([["a", "b", "c"]])), 400, ("numbers",)),
        (
            {"Content-Type": tensors.NPY, "X-Tensor-Name": "inputs"},
            npy(np.zeros((1, 3))),
            400,
            ("X-Tensor-Name",),
        ),
        ({"Content-Type": "text/plain"}, b"1,2,3", 415, ("text/plain",)),
    ],
)
def test_bad_binary_requests_are_problems(client, headers, content, status, needles):
    assert client.put("/v1/models/three", json={"num_classes": 3}).status_code == 201
    response = client.post("/v1/models/three/calibrate", content=content, headers=headers)
    assert_problem(response, status, *needles)


def test_lean_routes_keep_auth_metrics_and_the_version_query(make_client):
    client = make_client(api_keys="adm:admin,rd:read")
    admin = {"X-API-Key": "adm"}
    assert client.put("/v1/models/three", json={"num_classes": 3}, headers=admin).status_code == 201
    body = {"json": {"logits": [[1.0, 0.0, -1.0]]}}
    assert_problem(client.post("/v1/models/three/calibrate", **body), 401)
    assert_problem(client.post("/v1/models/three/calibrate", **body, headers={"X-API-Key": "nope"}), 401)
    assert (
        client.post("/v1/models/three/calibrate", **body, headers={"Authorization": "Bearer rd"}).status_code
        == 200
    )
    assert client.post("/v1/models/three/calibrate", **body, headers={"X-API-Key": "rd"}).status_code == 200
    for bad in ("0", "x", str(2**31)):
        response = client.post(
            "/v1/models/three/calibrate", **body, params={"version": bad}, headers={"X-API-Key": "rd"}
        )
        assert_problem(response, 422, "version")
    missing = client.post("/v1/models/three/calibrate", **body, params={"version": 3}, headers=admin)
    assert_problem(missing, 404)
    assert_problem(
        client.post("/v1/models/.hidden/calibrate", **body, headers=admin), 400, "invalid model name"
    )
    metrics = client.get("/metrics").text
    assert 'route="/v1/models/{name}/calibrate"' in metrics
    assert 'model="three",route="/v1/models/{name}/calibrate",status="200"' in metrics.replace(
        'method="POST",', ""
    )


def test_a_change_made_by_another_worker_is_served_from_the_next_request(make_client, tmp_path, cifar10):
    """Two apps on one store stand for two workers: each caches model views by stat stamps."""
    first, second = make_client(), make_client()
    assert first.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
    logits = {"json": {"logits": cifar10["logits_test"][:3].tolist()}}
    assert second.post("/v1/models/wrn/calibrate", **logits).json()["calibrator_version"] is None
    names = [f"class{k}" for k in range(10)]
    assert (
        first.put("/v1/models/wrn", json={"num_classes": 10, "class_names": names}).status_code == 200
    )  # an update
    answer = second.post("/v1/models/wrn/calibrate", **logits).json()
    assert answer["predicted_label"] == [names[k] for k in answer["predicted_class"]]
    fitted = first.post(
        "/v1/models/wrn/fit",
        json={"logits": cifar10["logits_val"].tolist(), "labels": cifar10["labels_val"].tolist()},
    ).json()
    answer = second.post("/v1/models/wrn/calibrate", **logits).json()
    assert answer["calibrator_version"] == fitted["version"]
    expected = softmax(cifar10["logits_test"][:3].astype(np.float64) / fitted["temperature"], axis=1)
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-6)
    assert first.delete("/v1/models/wrn").status_code in (200, 204)
    assert_problem(second.post("/v1/models/wrn/calibrate", **logits), 404)


def test_openapi_documents_every_media_type(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/models/{name}/calibrate", "/v1/models/{name}/predict"):
        operation = paths[path]["post"]
        assert set(operation["requestBody"]["content"]) == set(tensors.MEDIA_TYPES)
        assert set(operation["responses"]["200"]["content"]) == set(tensors.MEDIA_TYPES)
        headers = {parameter["name"] for parameter in operation["parameters"] if parameter["in"] == "header"}
        assert {tensors.SHAPE_HEADER, tensors.DTYPE_HEADER, tensors.NAME_HEADER} <= headers


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.uint8]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_npy_codec_matches_numpy(array):
    reference = npy(array)
    assert tensors.encode_npy(array, array.dtype) == reference
    back = tensors.decode_npy(reference)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    fortran = npy(np.asfortranarray(array))  # a header np.load must read (the slow path)
    np.testing.assert_array_equal(tensors.decode_npy(fortran), array)
