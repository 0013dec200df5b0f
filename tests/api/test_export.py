"""GET /v1/models/{name}/export?format=torchscript: the file gives the service's probabilities."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from tests.helpers.data import DIGITS_LOGIT_ULPS
from tests.helpers.numerics import EPS32, assert_softmax_close
from tests.helpers.problems import assert_problem

METHODS = ["temperature", "vector", "matrix", "isotonic", "histogram"]


def load(response) -> tuple[torch.jit.ScriptModule, dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    extra = {"calibserve.json": ""}
    module = torch.jit.load(io.BytesIO(response.content), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["calibserve.json"])


@pytest.mark.parametrize("method", METHODS)
def test_exported_calibrator_equals_the_service(cifar_model, cifar10, method):
    client = cifar_model
    options = {"binning": "mass"} if method == "histogram" else {}
    fitted = client.post(
        "/v1/models/wrn/fit",
        json={
            "logits": cifar10["logits_val"][:2000].tolist(),
            "labels": cifar10["labels_val"][:2000].tolist(),
            "method": method,
            "options": options,
        },
    )
    assert fitted.status_code == 201, fitted.text
    # a writable copy: the session's arrays are read-only, which torch.from_numpy warns about
    logits = cifar10["logits_test"][:500].copy()
    served = np.asarray(
        client.post("/v1/models/wrn/calibrate", json={"logits": logits.tolist()}).json()["probabilities"]
    )
    response = client.get("/v1/models/wrn/export", params={"format": "torchscript"})
    module, metadata = load(response)
    assert response.headers["x-calibrator-version"] == "1"
    assert metadata["calibrator"]["method"] == method and metadata["input"] == "logits"
    with torch.inference_mode():
        exported32 = module(torch.from_numpy(logits)).numpy()
        exported64 = module(torch.from_numpy(logits.astype(np.float64))).numpy()
    assert exported32.dtype == np.float32 and exported64.dtype == np.float64
    # the module computes in float64 like the service (torch's exp and matmul against numpy's: float64
    # rounding); for float32 input it rounds its answer to float32, half an ulp relative to each value
    np.testing.assert_allclose(exported64, served, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(exported32, served, rtol=EPS32, atol=1e-15)


@pytest.mark.parametrize("method", ["platt", "temperature", "isotonic"])
def test_binary_single_column_models_export(client, method):
    rng = np.random.default_rng(0)
    margin = rng.normal(size=(400, 1)) * 3
    labels = (rng.random(400) < 1 / (1 + np.exp(-0.5 * margin[:, 0]))).astype(int)
    # the v1 API counts logit columns here: a single-logit binary model is num_classes 1
    assert client.put("/v1/models/binary", json={"num_classes": 1}).status_code == 201
    fitted = client.post(
        "/v1/models/binary/fit", json={"logits": margin.tolist(), "labels": labels.tolist(), "method": method}
    )
    assert fitted.status_code == 201, fitted.text
    test = rng.normal(size=(50, 1)) * 3
    served = client.post("/v1/models/binary/calibrate", json={"logits": test.tolist()}).json()[
        "probabilities"
    ]
    module, _ = load(client.get("/v1/models/binary/export"))
    np.testing.assert_allclose(module(torch.from_numpy(test)).numpy(), served, atol=1e-6)


def test_torchscript_model_exports_model_then_calibrator(client, digits):
    validation, test = digits["validation"], digits["test"]
    fitted = client.post(
        "/v1/models/digits-mlp/fit",
        json={"inputs": validation["inputs"].tolist(), "labels": validation["labels"].tolist()},
    )
    assert fitted.status_code == 201, fitted.text
    inputs = test["inputs"][:100].astype(np.float32)
    served = client.post("/v1/models/digits-mlp/predict", json={"inputs": inputs.tolist()}).json()
    module, metadata = load(client.get("/v1/models/digits-mlp/export"))
    assert metadata["input"] == "inputs" and metadata["input_shape"] == [64]
    with torch.inference_mode():
        exported = module(torch.from_numpy(inputs)).numpy()
    # the same TorchScript forward pass here and in the service (float32 logits, up to kernel rounding), then
    # the same float64 calibration, rounded to float32 by the module (covered by the logits' tolerance)
    logits = test["logits"][:100]
    temperature = fitted.json()["temperature"]
    assert_softmax_close(
        exported, served["probabilities"], logits, ulps=DIGITS_LOGIT_ULPS, temperature=temperature
    )
    # the temperature really is in the file: without it the answer is the model's plain softmax
    plain = torch.softmax(torch.from_numpy(test["logits"][:100].copy()).double(), dim=1).numpy()
    assert np.abs(exported - plain).max() > 1e-3


def test_version_pin_no_calibrator_and_bad_requests(cifar_model, cifar10):
    client = cifar_model
    logits = cifar10["logits_test"][:50].copy()
    module, metadata = load(client.get("/v1/models/wrn/export"))
    assert metadata["calibrator_version"] is None
    softmax = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    np.testing.assert_allclose(module(torch.from_numpy(logits)).numpy(), softmax, atol=1e-6)

    for count in (300, 5000):
        body = {
            "logits": cifar10["logits_val"][:count].tolist(),
            "labels": cifar10["labels_val"][:count].tolist(),
        }
        assert client.post("/v1/models/wrn/fit", json=body).status_code == 201
    pinned = client.post(
        "/v1/models/wrn/calibrate", json={"logits": logits.tolist()}, params={"version": 1}
    ).json()
    response = client.get("/v1/models/wrn/export", params={"version": 1})
    module, metadata = load(response)
    assert metadata["calibrator_version"] == 1 and response.headers["x-calibrator-version"] == "1"
    assert "wrn-calibrated-v1.pt" in response.headers["content-disposition"]
    np.testing.assert_allclose(module(torch.from_numpy(logits)).numpy(), pinned["probabilities"], atol=1e-6)

    assert_problem(client.get("/v1/models/wrn/export", params={"format": "onnx"}), 400, "onnx")
    assert_problem(client.get("/v1/models/wrn/export", params={"version": 9}), 404)
    assert_problem(client.get("/v1/models/ghost/export"), 404, "ghost")
