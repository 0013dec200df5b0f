"""The protocol-neutral serving layer: defects found in review, each with the test that showed it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import workflows
from service.config import Settings
from service.registry import ModelRegistry
from service.serving.dataplane import DataPlane
from service.serving.state import AppState
from service.store import CalibratorStore
from tests.helpers.torchscript import Raises, scripted


def _document(temperature: float) -> dict:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 3
    labels = rng.integers(0, 3, size=200)
    document = workflows.fit_document(logits, labels, model="m")
    return {
        **document,
        "temperature": temperature,
        "params": {**document["params"], "temperature": temperature},
    }


class OtherWorkerInterleaves(CalibratorStore):
    """The real store, with another worker's activate-and-delete landing between reading the active pointer
    and reading the version it names (the interleaving that made calibrate answer 404)."""

    armed = True

    def get_calibrator(self, name: str, version: int) -> dict:
        if self.armed and version == 1:
            self.armed = False
            other = CalibratorStore(self.root)
            other.activate(name, 2)
            other.delete_calibrator(name, 1)
        return super().get_calibrator(name, version)


def test_active_calibrator_survives_another_worker_activating_and_deleting_in_between(tmp_path):
    seed = CalibratorStore(tmp_path)
    seed.put_model("m", {"kind": "logits", "num_classes": 3})
    seed.add_calibrator("m", _document(1.5))
    seed.add_calibrator("m", _document(2.5), activate=False)
    store = OtherWorkerInterleaves(tmp_path)
    state = AppState(settings=Settings(store_dir=tmp_path), store=store, registry=ModelRegistry(None))
    state.ready = True
    plane = DataPlane(state)
    prediction = asyncio.run(plane.calibrate("m", None, "logits", np.array([[2.0, 0.0, -1.0]])))
    assert not store.armed  # the interleaving happened
    assert prediction.calibrator_version == 2
    expected = np.exp(np.array([2.0, 0.0, -1.0]) / 2.5)
    np.testing.assert_allclose(prediction.probabilities[0], expected / expected.sum(), rtol=1e-12)


def _failures(model: str) -> float:
    return REGISTRY.get_sample_value("calibserve_model_failures_total", {"model": model}) or 0.0


def test_model_failures_are_counted(client):
    assert client.put("/v1/models/fails/torchscript", content=scripted(Raises())).status_code == 200
    before = _failures("fails")
    for _ in range(3):
        assert client.post("/v1/models/fails/predict", json={"inputs": [[1.0], [2.0]]}).status_code == 502
    assert (
        client.post("/v1/models/fails/fit", json={"inputs": [[1.0], [2.0]], "labels": [0, 1]}).status_code
        == 502
    )
    assert _failures("fails") == before + 4
    assert 'calibserve_model_failures_total{model="fails"}' in client.get("/metrics").text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # beside tests/api/test_bad_input.py's cursor, limit and version: other routes, identical values
        ("GET", "/v1/models/digits-mlp/calibrators?limit=1&limit=1"),
        ("GET", "/v1/models/digits-mlp/export?format=torchscript&format=torchscript"),
        ("POST", "/v1/models/digits-mlp/predict?x=1&x=1"),
    ],
)
def test_repeated_query_parameters_are_422_on_every_route(client, method, path):
    response = client.request(method, path, json={"inputs": [[0.0] * 64]} if method == "POST" else None)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "more than once" in response.json()["detail"]


def test_repeated_query_parameters_are_400_under_the_open_inference_protocol(client):
    body = {"inputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}]}
    response = client.post("/v2/models/digits-mlp/infer?x=1&x=2", json=body)
    assert response.status_code == 400
    assert "more than once" in response.json()["error"]


@pytest.mark.parametrize("text", ["0", "-1", "2147483648", "1e3", "٣", "¹", "01x", ""])
def test_one_version_rule_on_every_protocol(client, text):
    assert (
        client.post(
            "/v1/models/digits-mlp/fit", json={"logits": [[0.0] * 10] * 2, "labels": [0, 1]}
        ).status_code
        == 201
    )
    v1 = client.post(f"/v1/models/digits-mlp/calibrate?version={text}", json={"logits": [[0.0] * 10]})
    assert v1.status_code == 422, v1.text
    assert v1.headers["content-type"] == "application/problem+json"
    if text:
        for path in (
            f"/v1/models/digits-mlp/calibrators/{text}",
            f"/v1/models/digits-mlp/calibrators/{text}/activate",
        ):
            response = client.request("GET" if path.endswith(text) else "POST", path)
            assert response.status_code == 422, (path, response.text)
        body = {"inputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": [0.0] * 10}]}
        v2 = client.post(f"/v2/models/digits-mlp/versions/{text}/infer", json=body)
        assert v2.status_code == 400
        assert "calibrator version" in v2.json()["error"]


def test_listings_hold_summaries_and_the_full_document_is_one_request_away(client):
    assert client.put("/v1/models/hist", json={"num_classes": 3}).status_code == 201
    rng = np.random.default_rng(1)
    body = {
        "logits": rng.normal(size=(600, 3)).tolist(),
        "labels": rng.integers(0, 3, size=600).tolist(),
        "method": "histogram",
        "options": {"n_bins": 200},
    }
    document = client.post("/v1/models/hist/fit", json=body).json()
    listing = client.get("/v1/models/hist/calibrators")
    (item,) = listing.json()["items"]
    assert "params" not in item and item["version"] == document["version"] and item["method"] == "histogram"
    assert item["fit"]["n"] == 600 and item["fit"]["after"]["ece"] == document["fit"]["after"]["ece"]
    assert len(listing.content) * 10 < len(
        client.get(f"/v1/models/hist/calibrators/{item['version']}").content
    )
