"""A multi-label model served by a real Triton Inference Server (the ``triton`` fixture), declared in the
models directory's ``model.json`` with ``"task": "multilabel"``: OIP answers K sigmoid probabilities,
before and after a fit whose inputs run through Triton."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from scipy.special import expit

from service.core.calibrators import calibrator_from_dict
from tests.helpers.servers import Server
from tests.helpers.triton import linear_logits


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel-proxy")
    declared = root / "models" / "tags"
    declared.mkdir(parents=True)
    record = {"num_classes": 3, "task": "multilabel", "upstream": {"url": triton.url, "model": "linear"}}
    (declared / "model.json").write_text(json.dumps(record))
    with Server(root / "store", models=root / "models") as server:
        yield server


def infer(url: str, x: np.ndarray) -> triton_http.InferResult:
    tensor = triton_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    outputs = [triton_http.InferRequestedOutput(name) for name in ("probabilities", "predicted_class")]
    with triton_http.InferenceServerClient(url.removeprefix("http://")) as client:
        return client.infer("tags", [tensor], outputs=outputs)


def test_a_declared_multilabel_upstream_model_answers_per_label_probabilities(proxy):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    z = linear_logits(x)
    plain = infer(proxy.url, x[:20])
    np.testing.assert_allclose(plain.as_numpy("probabilities"), expit(z[:20]), rtol=1e-5, atol=1e-6)
    assert plain.as_numpy("predicted_class").shape == (20, 3)
    labels = (rng.random(z.shape) < expit(z / 2.5)).astype(int)  # the model is over-confident by 2.5
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        assert http.get("/v1/models/tags").json()["task"] == "multilabel"
        fitted = http.post("/v1/models/tags/fit", json={"inputs": x.tolist(), "labels": labels.tolist()})
        assert fitted.status_code == 201, fitted.text
        assert http.get("/v1/models/tags").json()["task"] == "multilabel"  # kept by the record the fit wrote
    calibrator = calibrator_from_dict(fitted.json())
    np.testing.assert_allclose(calibrator.temperatures_, 2.5, rtol=0.3)
    answer = infer(proxy.url, x[:20])
    np.testing.assert_allclose(
        answer.as_numpy("probabilities"), calibrator.transform(z[:20]), rtol=1e-5, atol=1e-6
    )
