"""One NLL on every HTTP path (issue #15): ``/v1/metrics`` and ``/v1/models/{name}/evaluate`` answer the exact
NLL (``null`` where infinite, with ``nll_infinite_rows``), the clipped one only with ``nll_clip``."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.test_nll_exact import CLIP, LABELS, PROBABILITIES, binary_isotonic, clipped_nll


@pytest.fixture
def binary_model(client):
    assert client.put("/v1/models/bin", json={"num_classes": 2}).status_code == 201
    return client


def npz_body(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_v1_metrics_answers_null_and_the_rows(client):
    body = {"probabilities": PROBABILITIES.tolist(), "labels": LABELS.tolist(), "losses": False}
    answer = client.post("/v1/metrics", json=body)
    assert answer.status_code == 200, answer.text
    figures = answer.json()
    assert figures["nll"] is None and figures["nll_infinite_rows"] == [0]
    assert figures["conventions"]["nll"] == "exact"
    clipped = client.post("/v1/metrics", json={**body, "nll_clip": CLIP}).json()
    assert clipped["nll"] == pytest.approx(clipped_nll(), rel=1e-12)
    assert clipped["conventions"]["nll"].startswith("clipped")
    # the same over an .npz body, nll_clip a query parameter (as the client sends it)
    npz = client.post(
        "/v1/metrics?losses=false&nll_clip=1e-15",
        content=npz_body(probabilities=PROBABILITIES, labels=LABELS),
        headers={"content-type": "application/x-npz"},
    )
    assert npz.status_code == 200, npz.text
    assert npz.json()["nll"] == pytest.approx(clipped_nll(), rel=1e-12)
    bad = client.post("/v1/metrics", json={**body, "nll_clip": 0.7})
    assert bad.status_code == 422 or bad.status_code == 400


def test_evaluate_route_answers_null_and_the_rows(binary_model):
    client = binary_model
    body = {"probabilities": PROBABILITIES.tolist(), "labels": LABELS.tolist()}
    report = client.post("/v1/models/bin/evaluate", json=body)
    assert report.status_code == 200, report.text
    assert report.json()["uncalibrated"]["nll"] is None
    assert report.json()["uncalibrated"]["nll_infinite_rows"] == [0]
    clipped = client.post("/v1/models/bin/evaluate", json={**body, "nll_clip": CLIP}).json()
    assert clipped["uncalibrated"]["nll"] == pytest.approx(clipped_nll(), rel=1e-12)
    # with an active calibrator that gives a true class probability 0
    document, logits, labels = binary_isotonic()
    uploaded = client.post("/v1/models/bin/calibrators", json=document)
    assert uploaded.status_code in (200, 201), uploaded.text
    calibrated = client.post(
        "/v1/models/bin/evaluate", json={"logits": logits.tolist(), "labels": labels.tolist()}
    ).json()
    assert calibrated["calibrated"]["nll"] is None
    assert calibrated["calibrated"]["nll_infinite_rows"] == [0]
