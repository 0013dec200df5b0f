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


def test_the_client_sends_integer_segments_in_the_npz_and_string_ones_as_json(client):
    """The client's request for each kind of key, sent through the real app."""
    from service.client import _labelled_call, _segments

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(120, 3))
    labels = rng.integers(0, 3, 120)
    for keys, content_type in ((rng.integers(0, 2, 120), "application/x-npz"), (["x", "y"] * 60, None)):
        call = _labelled_call(
            "/v1/metrics",
            {"logits": logits, "labels": labels, "segments": _segments(keys)},
            {"losses": False, "min_segment_size": 10},
            binary=True,
        )
        assert call.content_type == content_type
        if content_type:
            answer = client.post(
                call.path, params=call.params, content=call.content, headers={"content-type": content_type}
            )
        else:
            answer = client.post(call.path, params=call.params, json=orjson_ready(call.json))
        assert answer.status_code == 200, answer.text
        assert answer.json()["segments"]["n_segments"] == 2


def orjson_ready(body: dict) -> dict:
    return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in body.items()}
