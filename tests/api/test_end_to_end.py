"""A real uvicorn process: what it fitted survives a restart; two processes on one store see each other."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from tests.helpers.servers import Server


def fit_body(data, scale: float = 1.0) -> dict:
    return {"logits": (data["logits_val"] * scale).tolist(), "labels": data["labels_val"].tolist()}


def test_fit_survives_restart(tmp_path, cifar10):
    store = tmp_path / "store"
    rows = {"logits": cifar10["logits_test"][:16].tolist()}
    with Server(store) as server, server.client() as http:
        assert http.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
        fitted = http.post("/v1/models/wrn/fit", json=fit_body(cifar10))
        assert fitted.status_code == 201, fitted.text
        temperature = fitted.json()["temperature"]
        before = http.post("/v1/models/wrn/calibrate", json=rows).json()
    with Server(store) as server, server.client() as http:
        after = http.post("/v1/models/wrn/calibrate", json=rows).json()
        assert after == before and after["calibrator_version"] == 1
        expected = softmax(cifar10["logits_test"][:16].astype(np.float64) / temperature, axis=1)
        np.testing.assert_allclose(after["probabilities"], expected, atol=1e-6)
        metrics = http.get("/metrics").text
        assert 'calibserve_active_temperature{model="wrn"}' in metrics


@pytest.mark.timeout(180)
def test_two_processes_on_one_store_see_each_others_fits(tmp_path, cifar10):
    store = tmp_path / "store"
    rows = {"logits": cifar10["logits_test"][:4].tolist()}
    with Server(store) as first, Server(store) as second, first.client() as a, second.client() as b:
        assert a.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
        assert b.get("/v1/models/wrn").status_code == 200
        one = a.post("/v1/models/wrn/fit", json=fit_body(cifar10)).json()
        assert b.post("/v1/models/wrn/calibrate", json=rows).json()["calibrator_version"] == one["version"]
        two = b.post("/v1/models/wrn/fit", json=fit_body(cifar10, 2.0)).json()
        assert two["version"] == one["version"] + 1
        served = a.post("/v1/models/wrn/calibrate", json=rows).json()
        assert served["calibrator_version"] == two["version"]
        expected = softmax(np.array(rows["logits"], dtype=np.float64) / two["temperature"], axis=1)
        np.testing.assert_allclose(served["probabilities"], expected, atol=1e-6)
        assert a.post(f"/v1/models/wrn/calibrators/{one['version']}/activate").status_code == 200
        assert b.post("/v1/models/wrn/calibrate", json=rows).json()["calibrator_version"] == one["version"]


@pytest.mark.timeout(180)
def test_several_workers_share_the_store_and_metrics(tmp_path, cifar10):
    store = tmp_path / "store"
    with Server(store, workers=2) as server, server.client() as http:
        assert http.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
        fitted = http.post("/v1/models/wrn/fit", json=fit_body(cifar10)).json()
        rows = {"logits": cifar10["logits_test"][:2].tolist()}
        for _ in range(20):  # new connections land on either worker
            with server.client() as fresh:
                assert (
                    fresh.post("/v1/models/wrn/calibrate", json=rows).json()["calibrator_version"]
                    == fitted["version"]
                )
        text = http.get("/metrics").text
        count = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("calibserve_requests_total{") and "/calibrate" in line
        )
        assert count == 20
