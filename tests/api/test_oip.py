"""Open Inference Protocol (KServe V2): JSON and binary tensors, versions, metadata, errors, real clients."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient  # a dev dependency: the real client, not our reading of it
from scipy.special import softmax

from tests.helpers.numerics import EPS32
from tests.helpers.servers import Server

# The service calibrates in float64 and answers FP32 (or FP64) tensors: an FP32 probability is the float64 one
# rounded to float32, within half an ulp of it (relative, so tiny probabilities are checked as closely as
# large ones); FP64 answers are far closer.
OUTPUT_RTOL = EPS32

ROWS = 16


@pytest.fixture
def wrn(client, cifar10):
    """A 10-class model with two fitted temperatures: version 1 on half the data, version 2 (active) on all."""
    assert client.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
    temperatures = []
    for count in (300, 2000):
        fitted = client.post(
            "/v1/models/wrn/fit",
            json={
                "logits": cifar10["logits_val"][:count].tolist(),
                "labels": cifar10["labels_val"][:count].tolist(),
            },
        )
        assert fitted.status_code == 201, fitted.text
        temperatures.append(fitted.json()["temperature"])
    assert temperatures[0] != temperatures[1]
    return client, temperatures, cifar10["logits_test"][:ROWS]


def tensor(name: str, array: np.ndarray, datatype: str = "FP32", *, nested: bool = False) -> dict:
    data = array.tolist() if nested else array.reshape(-1).tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def binary_request(
    array: np.ndarray, *, name: str = "logits", datatype: str = "FP32", outputs: list | None = None, **extra
) -> tuple[bytes, dict]:
    """The body and headers ``tritonclient.http`` sends for one binary input."""
    dtype = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2"}[datatype]
    raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
    document = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        **extra,
    }
    if outputs is None:
        document["parameters"] = {"binary_data_output": True}
    else:
        document["outputs"] = outputs
    header = orjson.dumps(document)
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def split_binary(response) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a response the way tritonclient's InferResult does."""
    length = response.headers.get("inference-header-content-length")
    if length is None:
        document = response.json()
        return document, {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in document["outputs"]}
    length = int(length)
    document = orjson.loads(response.content[:length])
    buffer, offset, arrays = response.content[length:], 0, {}
    dtypes = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}
    for output in document["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.asarray(output["data"]).reshape(output["shape"])
            continue
        data = np.frombuffer(buffer[offset : offset + size], dtype=dtypes[output["datatype"]])
        arrays[output["name"]] = data.reshape(output["shape"])
        offset += size
    assert offset == len(buffer)
    return document, arrays


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16"])
def test_json_infer_matches_calibrate(wrn, datatype, nested):
    client, temperatures, logits = wrn
    sent = logits.astype({"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}[datatype])
    response = client.post(
        "/v2/models/wrn/infer",
        json={"id": "req-7", "inputs": [tensor("logits", sent, datatype, nested=nested)]},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "req-7" and body["model_name"] == "wrn" and body["model_version"] == "2"
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [ROWS, 10]
    assert output["datatype"] == ("FP64" if datatype == "FP64" else "FP32")
    expected = softmax(sent.astype(np.float64) / temperatures[1], axis=1)
    np.testing.assert_allclose(np.reshape(output["data"], (ROWS, 10)), expected, rtol=OUTPUT_RTOL, atol=1e-15)


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16"])
def test_binary_infer_round_trip(wrn, datatype):
    client, temperatures, logits = wrn
    sent = logits.astype({"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}[datatype])
    body, headers = binary_request(sent, datatype=datatype, id="b1")
    response = client.post("/v2/models/wrn/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    document, arrays = split_binary(response)
    assert document["id"] == "b1"
    assert document["outputs"][0]["parameters"]["binary_data_size"] == ROWS * 10 * (
        8 if datatype == "FP64" else 4
    )
    expected = softmax(sent.astype(np.float64) / temperatures[1], axis=1)
    np.testing.assert_allclose(arrays["probabilities"], expected, rtol=OUTPUT_RTOL, atol=1e-15)


def test_requested_outputs_mix_binary_and_json(wrn):
    client, temperatures, logits = wrn
    outputs = [
        {"name": "predicted_class", "parameters": {"binary_data": True}},
        {"name": "logits"},
        {"name": "probabilities", "parameters": {"binary_data": True}},
    ]
    body, headers = binary_request(logits, outputs=outputs)
    response = client.post("/v2/models/wrn/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    document, arrays = split_binary(response)
    assert [output["name"] for output in document["outputs"]] == [
        "predicted_class",
        "logits",
        "probabilities",
    ]
    assert "data" in document["outputs"][1] and "data" not in document["outputs"][2]
    expected = softmax(logits.astype(np.float64) / temperatures[1], axis=1)
    np.testing.assert_allclose(arrays["probabilities"], expected, rtol=OUTPUT_RTOL, atol=1e-15)
    np.testing.assert_array_equal(arrays["predicted_class"], expected.argmax(axis=1))
    assert arrays["predicted_class"].dtype == np.int64
    np.testing.assert_allclose(arrays["logits"], logits, rtol=1e-6)


def test_versions_path_pins_a_calibrator(wrn):
    client, temperatures, logits = wrn
    request = {"inputs": [tensor("logits", logits)]}
    pinned = client.post("/v2/models/wrn/versions/1/infer", json=request).json()
    assert pinned["model_version"] == "1"
    expected = softmax(logits.astype(np.float64) / temperatures[0], axis=1)
    np.testing.assert_allclose(
        np.reshape(pinned["outputs"][0]["data"], (ROWS, 10)), expected, rtol=OUTPUT_RTOL, atol=1e-15
    )
    missing = client.post("/v2/models/wrn/versions/9/infer", json=request)
    assert missing.status_code == 404 and "9" in missing.json()["error"]
    assert client.get("/v2/models/wrn/versions/1/ready").json() == {"name": "wrn", "ready": True}
    assert client.get("/v2/models/wrn/versions/9/ready").status_code == 404
    assert client.get("/v2/models/wrn/versions/1").json()["versions"] == ["1"]


def test_probabilities_input_and_torchscript_inputs(wrn, digits):
    client, temperatures, logits = wrn
    probabilities = softmax(logits.astype(np.float64), axis=1)
    response = client.post(
        "/v2/models/wrn/infer", json={"inputs": [tensor("probabilities", probabilities, "FP64")]}
    )
    assert response.status_code == 200, response.text
    expected = softmax(np.log(probabilities) / temperatures[1], axis=1)
    np.testing.assert_allclose(
        np.reshape(response.json()["outputs"][0]["data"], (ROWS, 10)), expected, rtol=OUTPUT_RTOL, atol=1e-15
    )

    inputs = digits["test"]["inputs"][:8].astype(np.float32)
    body, headers = binary_request(inputs, name="inputs")
    response = client.post("/v2/models/digits-mlp/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    _, arrays = split_binary(response)
    predicted = client.post("/v1/models/digits-mlp/predict", json={"inputs": inputs.tolist()}).json()
    np.testing.assert_allclose(
        arrays["probabilities"], predicted["probabilities"], rtol=OUTPUT_RTOL, atol=1e-15
    )


def test_metadata_and_health(wrn):
    client, _, _ = wrn
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    metadata = client.get("/v2/models/wrn").json()
    assert metadata["name"] == "wrn" and metadata["versions"] == ["2", "1"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 10]} in metadata["inputs"]
    assert metadata["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    shipped = client.get("/v2/models/digits-mlp").json()
    assert shipped["inputs"][0] == {"name": "inputs", "datatype": "FP32", "shape": [-1, 64]}
    assert client.get("/v2/models/digits-mlp/ready").json() == {"name": "digits-mlp", "ready": True}
    missing = client.get("/v2/models/ghost")
    assert missing.status_code == 404 and missing.json() == {"error": "model 'ghost' does not exist"}


GOOD = {"name": "logits", "shape": [2, 10], "datatype": "FP32", "data": [0.0] * 20}


@pytest.mark.parametrize(
    ("request_body", "needle"),
    [
        ({"inputs": [{**GOOD, "datatype": "INT8"}]}, "datatype"),
        ({"inputs": [{**GOOD, "datatype": "BYTES"}]}, "datatype"),
        ({"inputs": [{**GOOD, "shape": [3, 10]}]}, "30"),
        ({"inputs": [{**GOOD, "shape": [20]}]}, "[N, K]"),
        ({"inputs": [{**GOOD, "shape": [2, -10]}]}, "shape"),
        ({"inputs": [{**GOOD, "shape": [4, 5]}]}, "10 classes"),
        ({"inputs": [{**GOOD, "data": [[0.0, 1.0], [2.0]]}]}, "rectangular"),
        ({"inputs": [{**GOOD, "data": ["a"] * 20}]}, "numbers"),
        ({"inputs": [{**GOOD, "name": "scores"}]}, "input name"),
        ({"inputs": [{**GOOD, "name": "inputs"}]}, "logits-only"),
        ({"inputs": [GOOD, GOOD]}, "exactly one"),
        ({"inputs": []}, "exactly one"),
        ({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}, "data"),
        ({"inputs": [GOOD], "outputs": [{"name": "entropy"}]}, "output name"),
        (
            {"inputs": [GOOD], "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]},
            "classification",
        ),
        ({"inputs": [GOOD], "parameters": {"binary_data_output": "yes"}}, "binary_data_output"),
        ({"inputs": [GOOD], "id": 5}, "id"),
        ({"inputs": [{**GOOD, "data": [1e39] * 20}]}, "NaN or Inf"),
    ],
)
def test_bad_json_requests_get_400_error_objects(wrn, request_body, needle):
    client, _, _ = wrn
    response = client.post("/v2/models/wrn/infer", json=request_body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and needle in body["error"], body


def test_bad_binary_requests_get_400_error_objects(wrn):
    client, _, logits = wrn
    body, headers = binary_request(logits)
    cases = [
        (body[:-4], headers, "binary_data_size"),  # truncated tensor
        (body + b"\0" * 4, headers, "binary_data_size"),  # trailing bytes
        (body, {"Inference-Header-Content-Length": str(len(body) + 1)}, "Inference-Header-Content-Length"),
        (body, {"Inference-Header-Content-Length": "abc"}, "Inference-Header-Content-Length"),
        (body, {}, "JSON"),  # binary bytes without the header length
    ]
    header = orjson.dumps({"inputs": [{**GOOD, "parameters": {"binary_data_size": 80}}]})
    cases.append((header + bytes(80), {"Inference-Header-Content-Length": str(len(header))}, "not both"))
    wrong_size = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "logits",
                    "shape": [2, 10],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 40},
                }
            ]
        }
    )
    cases.append(
        (wrong_size + bytes(40), {"Inference-Header-Content-Length": str(len(wrong_size))}, "needs 80")
    )
    for content, extra_headers, needle in cases:
        response = client.post("/v2/models/wrn/infer", content=content, headers=extra_headers)
        assert response.status_code == 400, (needle, response.text)
        assert needle in response.json()["error"], (needle, response.json())


def test_auth_and_unknown_models_answer_error_objects(make_client):
    client = make_client(api_keys="adm:admin,rd:read")
    assert (
        client.put("/v1/models/three", json={"num_classes": 3}, headers={"X-API-Key": "adm"}).status_code
        == 201
    )
    request = {"inputs": [{"name": "logits", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}
    for path in ("/v2/models/three/infer", "/v2/models/three/versions/1/infer"):
        denied = client.post(path, json=request)
        assert denied.status_code == 401 and "API key" in denied.json()["error"]
    for path in ("/v2/models/three", "/v2/models/three/ready", "/v2/models/three/versions/1/ready"):
        denied = client.get(path)
        assert denied.status_code == 401 and list(denied.json()) == ["error"], path
    assert client.get("/v2/models/three/ready", headers={"X-API-Key": "nope"}).status_code == 401
    assert client.get("/v2/health/ready").status_code == 200  # probes stay open, like /readyz
    ok = client.post("/v2/models/three/infer", json=request, headers={"Authorization": "Bearer rd"})
    assert ok.status_code == 200, ok.text
    assert "model_version" not in ok.json()  # no calibrator yet: plain softmax
    ghost = client.post("/v2/models/ghost/infer", json=request, headers={"X-API-Key": "rd"})
    assert ghost.status_code == 404 and "ghost" in ghost.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("GET", "/v2/models/a%2Fb", 400, "invalid model name 'a/b'"),  # decoded, it would match no route
        ("GET", "/v2/models/..%2Fetc/ready", 400, "invalid model name"),
        ("GET", "/v2/models/wrn/nothing", 404, "no route matches GET"),
        ("GET", "/v2/anything", 404, "no route matches GET"),
        ("PUT", "/v2/models/wrn/infer", 405, "PUT is not allowed"),
        ("DELETE", "/v2/models/wrn", 405, "DELETE is not allowed"),
        ("OPTIONS", "/v2/anything", 404, "no route matches OPTIONS"),
    ],
)
def test_unmatched_v2_paths_answer_error_objects(client, method, path, status, needle):
    response = client.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"] and needle in response.json()["error"]
    if status == 405:
        assert "POST" in response.headers["allow"] or "GET" in response.headers["allow"]


def test_trailing_slashes_redirect_to_the_served_path_and_head_of_nothing_is_404(client):
    for method, path in [
        ("GET", "/v2/"),
        ("GET", "/v2/models/wrn/ready/"),
        ("POST", "/v2/models/wrn/infer/"),
    ]:
        response = client.request(method, path, follow_redirects=False)
        assert response.status_code == 307, (path, response.text)  # as Starlette itself redirects
        assert response.headers["location"].endswith(path.rstrip("/"))
    assert client.get("/v1/models/digits-mlp/", follow_redirects=False).status_code == 307
    for path in ("/v2/nothing", "/v1/models/digits-mlp/nothing"):
        assert client.head(path).status_code == 404  # not a 405 with an empty Allow


# --------------------------------------------------------------------------------- against a live server


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("oip-store")) as server:
        with server.client() as http:
            assert http.put("/v1/models/three", json={"num_classes": 3}).status_code == 201
        yield server


LOGITS = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 4.0], [1.0, 1.0, 1.0]], dtype=np.float32)


def test_exact_tritonclient_wire_format_over_http(live):
    """The bytes ``tritonclient.http`` sends (json.dumps header, raw tensor, no Content-Type)."""
    import json

    header = json.dumps(
        {
            "id": "w1",
            "inputs": [
                {
                    "name": "logits",
                    "shape": [3, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 36},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    with live.client() as http:
        response = http.post(
            "/v2/models/three/infer",
            content=header + LOGITS.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    assert response.status_code == 200, response.text
    document, arrays = split_binary(response)
    assert document["id"] == "w1"
    np.testing.assert_allclose(
        arrays["probabilities"], softmax(LOGITS.astype(np.float64), axis=1), rtol=OUTPUT_RTOL, atol=1e-15
    )


def test_tritonclient_http_infers_against_a_live_server(live):
    client = httpclient.InferenceServerClient(url=live.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("three")
        assert client.get_model_metadata("three")["name"] == "three"
        for binary in (True, False):
            tensor_input = httpclient.InferInput("logits", list(LOGITS.shape), "FP32")
            tensor_input.set_data_from_numpy(LOGITS, binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput("probabilities", binary_data=binary),
                httpclient.InferRequestedOutput("predicted_class", binary_data=binary),
            ]
            result = client.infer("three", [tensor_input], outputs=outputs, request_id="t1")
            expected = softmax(LOGITS.astype(np.float64), axis=1)
            np.testing.assert_allclose(
                result.as_numpy("probabilities"), expected, rtol=OUTPUT_RTOL, atol=1e-15
            )
            np.testing.assert_array_equal(result.as_numpy("predicted_class"), expected.argmax(axis=1))
            assert result.get_response()["id"] == "t1"
        tensor_input = httpclient.InferInput("logits", [1, 2], "FP32")
        tensor_input.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
        with pytest.raises(httpclient.InferenceServerException, match="3 classes"):
            client.infer("three", [tensor_input])
    finally:
        client.close()
