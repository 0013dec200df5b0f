"""TorchScript models: predict, fit on inputs, uploads (good and corrupt), models that fail at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from tests.helpers.data import DIGITS_LOGIT_ULPS
from tests.helpers.numerics import assert_float32_close, assert_softmax_close
from tests.helpers.problems import assert_problem
from tests.helpers.torchscript import Linear, Raises, ReturnsNaN, scripted

DIGITS_ULPS = DIGITS_LOGIT_ULPS  # float32 rounding of the digits MLP's logits: see tests/helpers/data.py


def test_predict_matches_the_shipped_model_and_calibrates(client, digits):
    test = digits["test"]
    response = client.post(
        "/v1/models/digits-mlp/predict", json={"inputs": test["inputs"].tolist(), "return_logits": True}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    # this machine's float32 forward pass against the stored one: equal up to float32 rounding (see DIGITS_ULPS)
    assert_float32_close(body["logits"], test["logits"], ulps=DIGITS_ULPS)
    expected = softmax(test["logits"].astype(np.float64), axis=1)
    assert_softmax_close(body["probabilities"], expected, test["logits"], ulps=DIGITS_ULPS)
    assert body["predicted_label"][0] == str(body["predicted_class"][0])
    accuracy = np.mean(np.array(body["predicted_class"]) == test["labels"])
    assert accuracy > 0.9


def test_fit_on_inputs_then_predict_uses_the_temperature(client, digits):
    validation = digits["validation"]
    fitted = client.post(
        "/v1/models/digits-mlp/fit",
        json={"inputs": validation["inputs"].tolist(), "labels": validation["labels"].tolist()},
    )
    assert fitted.status_code == 201, fitted.text
    temperature = fitted.json()["temperature"]
    rows = digits["test"]["inputs"][:5]
    body = client.post("/v1/models/digits-mlp/predict", json={"inputs": rows.tolist()}).json()
    logits = digits["test"]["logits"][:5]
    expected = softmax(logits.astype(np.float64) / temperature, axis=1)
    assert_softmax_close(body["probabilities"], expected, logits, ulps=DIGITS_ULPS, temperature=temperature)
    assert body["calibrator_version"] == 1


def test_bad_inputs_to_predict(client):
    assert_problem(client.post("/v1/models/digits-mlp/predict", json={"inputs": [[0.0] * 5]}), 400, "64")
    # 1e39 is finite in JSON but overflows the model's float32 input: refused, not silently inf
    assert_problem(client.post("/v1/models/digits-mlp/predict", json={"inputs": [[1e39] * 64]}), 400)


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a model at all", b"PK\x03\x04" + b"\x00" * 100, None],
    ids=["empty", "text", "zip-header", "truncated"],
)
def test_corrupt_upload_is_refused_and_the_old_model_keeps_serving(client, payload):
    good = scripted(Linear(seed=0))
    assert (
        client.put(
            "/v1/models/up/torchscript", content=good, headers={"X-Model-Input-Shape": "4"}
        ).status_code
        == 200
    )
    before = client.post("/v1/models/up/predict", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]}).json()
    bad = good[: len(good) // 2] if payload is None else payload
    response = client.put("/v1/models/up/torchscript", content=bad)
    assert_problem(response, 400)
    after = client.post("/v1/models/up/predict", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]}).json()
    assert after == before


def test_models_that_fail_at_inference_get_502_and_show_in_readyz(client):
    for name, module in (("raises", Raises()), ("nan", ReturnsNaN())):
        assert client.put(f"/v1/models/{name}/torchscript", content=scripted(module)).status_code == 200
        for _ in range(3):
            response = client.post(f"/v1/models/{name}/predict", json={"inputs": [[1.0], [2.0]]})
            assert_problem(response, 502, name)
    assert "NaN" in client.post("/v1/models/nan/predict", json={"inputs": [[1.0], [2.0]]}).json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert {"raises", "nan"} <= set(ready.json()["failing_models"])
    ok = client.post("/v1/models/digits-mlp/predict", json={"inputs": [[0.0] * 64]})
    assert ok.status_code == 200


def test_broken_file_in_models_dir_does_not_stop_the_others(make_client, models_dir):
    (models_dir / "broken").mkdir()
    (models_dir / "broken" / "model.pt").write_bytes(b"garbage")
    client = make_client()
    ready = client.get("/readyz").json()
    assert "broken" in ready["failing_models"] and "digits-mlp" in ready["models"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_models_live_on_the_gpu_when_asked(make_client, digits):
    client = make_client(device="cuda")
    info = client.get("/v1/models/digits-mlp").json()
    assert info["device"].startswith("cuda")
    body = client.post(
        "/v1/models/digits-mlp/predict",
        json={"inputs": digits["test"]["inputs"][:16].tolist(), "return_logits": True},
    ).json()
    assert_float32_close(body["logits"], digits["test"]["logits"][:16], ulps=DIGITS_ULPS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["temperature", "matrix", "isotonic"])
@pytest.mark.parametrize("batching", [{}, {"batch_max_size": 32, "batch_max_delay_ms": 5.0}])
def test_predict_on_the_gpu_calibrates_there_like_the_cpu(make_client, digits, tmp_path, method, batching):
    validation, rows = digits["validation"], digits["test"]["inputs"][:40]
    answers = []
    for device in ("cpu", "cuda"):
        client = make_client(device=device, store_dir=tmp_path / device, **batching)
        fitted = client.post(
            "/v1/models/digits-mlp/fit",
            json={
                "method": method,
                "logits": validation["logits"].tolist(),
                "labels": validation["labels"].tolist(),
            },
        )
        assert fitted.status_code == 201, fitted.text
        body = client.post("/v1/models/digits-mlp/predict", json={"inputs": rows.tolist()}).json()
        answers.append((np.array(body["probabilities"]), body["predicted_class"]))
    # the model's own logits differ by float32 rounding between devices; calibration is in float64 on either.
    # Temperature and matrix scaling are smooth, so the probabilities move only as much as that rounding moves
    # them; isotonic is a step function, whose steps a rounding may cross: there only the argmax is compared.
    logits = digits["test"]["logits"][:40]
    if method != "isotonic":
        assert_softmax_close(answers[1][0], answers[0][0], logits, ulps=4 * DIGITS_ULPS)
    # the same class wherever the CPU's top two probabilities are not a near-tie
    top_two = np.sort(answers[0][0], axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-3
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.array(answers[1][1])[clear], np.array(answers[0][1])[clear])
