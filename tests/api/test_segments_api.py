"""Segments over HTTP (issue #15): ``"segments": [...]`` on ``/v1/metrics`` and ``/evaluate``, as JSON
(string keys) and in an ``.npz`` body (integer keys, the client's way)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service import workflows


def test_v1_metrics_with_segments(client):
    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 2.0, size=(400, 3))
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    keys = rng.integers(0, 2, 400)
    local = workflows.evaluate(logits, labels, segments=keys.tolist(), min_segment_size=50)["segments"]
    body = {
        "logits": logits.tolist(),
        "labels": labels.tolist(),
        "losses": False,
        "segments": [f"s{k}" for k in keys],
        "min_segment_size": 50,
    }
    answer = client.post("/v1/metrics", json=body)
    assert answer.status_code == 200, answer.text
    segments = answer.json()["segments"]
    assert segments["by_segment"]["s0"]["uncalibrated"]["ece"] == pytest.approx(
        local["by_segment"]["0"]["uncalibrated"]["ece"], rel=1e-12
    )
    buffer = io.BytesIO()
    np.savez(buffer, logits=logits, labels=labels, segments=keys)
    binary = client.post(
        "/v1/metrics?losses=false&min_segment_size=50",
        content=buffer.getvalue(),
        headers={"content-type": "application/x-npz"},
    )
    assert binary.status_code == 200, binary.text
    assert binary.json()["segments"]["worst"] == local["worst"]
    bad = client.post("/v1/metrics", json={**body, "segments": ["a"] * 3})
    assert bad.status_code == 400 and "one segment per row" in bad.text
