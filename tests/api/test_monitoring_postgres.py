"""Two replicas on two hosts (two stores, no shared directory) share one real PostgreSQL monitoring database:
a prediction served by one is labelled through the other, each id counts once whichever replica gets it, and
both answer the same window."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.helpers.waiting import wait_until


@pytest.fixture
def replicas(postgres, tmp_path):
    url = postgres.create_database()
    clients = []
    for name in ("a", "b"):
        settings = Settings(
            models_dir=None,
            store_dir=tmp_path / name,
            prediction_log="on",
            database_url=url,
            monitoring_min_outcomes=5,
        )
        client = TestClient(create_app(settings))
        client.__enter__()
        assert client.put("/v1/models/m", json={"num_classes": 4}).status_code == 201
        clients.append(client)
    yield clients
    for client in clients:
        client.__exit__(None, None, None)


def test_replicas_on_one_postgres_count_each_outcome_once(replicas):
    first, second = replicas
    z = np.random.default_rng(0).normal(size=(60, 4)) * 2
    labels = (np.arange(60) % 4).tolist()
    for replica in replicas:  # the same calibrator on both (their stores are their own here)
        fitted = replica.post("/v1/models/m/fit", json={"logits": z.tolist(), "labels": labels})
        assert fitted.status_code == 201 and fitted.json()["version"] == 1
    served = first.post("/v1/models/m/calibrate", json={"logits": z.tolist()}).json()
    ids = served["prediction_ids"]

    def logged() -> bool:  # the first replica's writer commits its log within 50 ms (a group commit)
        window = second.get("/v1/models/m/monitoring", params={"window": "1h"}).json()
        return window["label_free"]["predictions"] == 60

    wait_until(logged, "the first replica's prediction log is committed", timeout=10)
    # the same labels posted to both replicas: counted once in all
    through_second = second.post(
        "/v1/models/m/outcomes", json={"prediction_ids": ids, "labels": labels}
    ).json()
    through_first = first.post("/v1/models/m/outcomes", json={"prediction_ids": ids, "labels": labels}).json()
    assert through_second["counted"] == 60 and through_first["repeat"] == 60
    windows = [client.get("/v1/models/m/monitoring", params={"window": "1h"}).json() for client in replicas]
    assert windows[0]["figures"] == windows[1]["figures"]
    assert windows[0]["figures"]["n"] == 60
    metrics = first.post(
        "/v1/metrics", json={"probabilities": served["probabilities"], "labels": labels, "losses": False}
    ).json()
    assert windows[0]["figures"]["ece"] == pytest.approx(metrics["ece"], rel=1e-9)
    gauges = [
        line
        for line in second.get("/metrics").text.splitlines()
        if line.startswith("calibserve_monitoring_window_outcomes")
    ]
    assert 'calibserve_monitoring_window_outcomes{model="m",window="1h"} 60.0' in gauges
