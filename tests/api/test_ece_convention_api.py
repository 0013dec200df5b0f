"""``ece_convention`` on every path (issue #15): ``/v1/metrics``, ``/v1/models/{name}/evaluate`` (JSON and
``.npz`` bodies, the client's way) and the library answer the same ``ece_<convention>``."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service import workflows
from service.core import metrics


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    logits = rng.normal(0.0, 3.0, size=(600, 3))
    labels = (logits / 2 + rng.gumbel(size=logits.shape)).argmax(axis=1)
    return logits, labels


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("convention", ["torchmetrics", "sklearn", "guo2017", "kumar2019"])
def test_v1_metrics_reports_the_convention(client, scores, convention):
    logits, labels = scores
    expected = metrics.expected_calibration_error(logits, labels, from_logits=True, convention=convention)
    body = {
        "logits": logits.tolist(),
        "labels": labels.tolist(),
        "losses": False,
        "ece_convention": convention,
    }
    answer = client.post("/v1/metrics", json=body)
    assert answer.status_code == 200, answer.text
    figures = answer.json()
    assert figures[f"ece_{convention}"] == pytest.approx(expected, abs=1e-12)
    assert figures["ece"] == pytest.approx(
        metrics.expected_calibration_error(logits, labels, from_logits=True)
    )
    assert f"ece_{convention}" in figures["conventions"]
    binary = client.post(
        f"/v1/metrics?losses=false&ece_convention={convention}",
        content=npz(logits=logits, labels=labels),
        headers={"content-type": "application/x-npz"},
    )
    assert binary.json()[f"ece_{convention}"] == pytest.approx(expected, abs=1e-12)


def test_evaluate_reports_the_convention_before_and_after(client, scores):
    logits, labels = scores
    assert client.put("/v1/models/three", json={"num_classes": 3}).status_code == 201
    document = workflows.fit_document(logits, labels)
    assert client.post("/v1/models/three/calibrators", json=document).status_code in (200, 201)
    answer = client.post(
        "/v1/models/three/evaluate",
        json={"logits": logits.tolist(), "labels": labels.tolist(), "ece_convention": "torchmetrics"},
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    local = workflows.evaluate(logits, labels, calibrator_document=document, ece_convention="torchmetrics")
    for group in ("uncalibrated", "calibrated"):
        assert report[group]["ece_torchmetrics"] == pytest.approx(local[group]["ece_torchmetrics"], abs=1e-12)
    unknown = client.post(
        "/v1/models/three/evaluate",
        json={"logits": logits.tolist(), "labels": labels.tolist(), "ece_convention": "pandas"},
    )
    assert unknown.status_code in (400, 422)


def test_v1_metrics_per_class_tests_on_request(client, scores):
    logits, labels = scores
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "losses": False}
    assert "per_class_tests" not in client.post("/v1/metrics", json=body).json()
    answer = client.post("/v1/metrics", json={**body, "per_class_tests": True}).json()
    expected = metrics.per_class_calibration_tests(logits, labels, from_logits=True)
    assert answer["per_class_tests"]["spiegelhalter_p"] == pytest.approx(
        expected["spiegelhalter_p"], rel=1e-12
    )
    binary = client.post(
        "/v1/metrics?losses=false&per_class_tests=true",
        content=npz(logits=logits, labels=labels),
        headers={"content-type": "application/x-npz"},
    ).json()
    assert len(binary["per_class_tests"]["hosmer_lemeshow_p"]) == 3
    assert "reliability_smooth" in binary and binary["ece_smooth"] == pytest.approx(answer["ece_smooth"])
