"""The monitoring routes' contract: prediction ids in every protocol's answers, outcomes by id and by logits,
bad input named per row or refused with a 4xx, windows, refits, and the exactly-once count under concurrent
posts of the same ids to several workers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.helpers.servers import Server


@pytest.fixture
def client(tmp_path):
    settings = Settings(
        models_dir=None,
        store_dir=tmp_path / "store",
        prediction_log="on",
        monitoring_min_outcomes=10,
        max_outcomes_per_request=1000,
    )
    with TestClient(create_app(settings)) as http:
        assert http.put("/v1/models/m", json={"num_classes": 3}).status_code == 201
        yield http


def logits(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3)) * 2


def test_every_protocol_answers_with_prediction_ids_that_outcomes_accept(client):
    json_answer = client.post("/v1/models/m/calibrate", json={"logits": logits(4).tolist()}).json()
    ids = json_answer["prediction_ids"]
    assert len(ids) == 4 and len(set(ids)) == 4
    raw = logits(3, seed=1).astype(np.float32)
    binary = client.post(
        "/v1/models/m/calibrate",
        content=raw.tobytes(),
        headers={"content-type": "application/octet-stream", "x-tensor-shape": "3,3"},
    )
    prefix = binary.headers["x-prediction-id-prefix"]
    v2 = client.post(
        "/v2/models/m/infer",
        json={
            "inputs": [
                {"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": logits(2).ravel().tolist()}
            ]
        },
    ).json()
    v2_ids = v2["parameters"]["prediction_ids"]
    everything = [*ids, *(f"{prefix}.{i}" for i in range(3)), *v2_ids]
    answer = client.post(
        "/v1/models/m/outcomes", json={"prediction_ids": everything, "labels": [0] * 9}
    ).json()
    assert answer["counted"] == 9, answer
    assert client.get("/v1/models/m/monitoring").json()["figures"]["n"] == 9


def test_outcomes_report_each_bad_row_and_count_the_good_ones_once(client):
    ids = client.post("/v1/models/m/calibrate", json={"logits": logits(3).tolist()}).json()["prediction_ids"]
    client.put("/v1/models/other", json={"num_classes": 3})
    other = client.post("/v1/models/other/calibrate", json={"logits": logits(1).tolist()}).json()[
        "prediction_ids"
    ]
    body = {
        "prediction_ids": [ids[0], "never-issued", ids[1], ids[0], other[0], ids[2]],
        "labels": [1, 0, 3, 1, 0, True],
    }
    answer = client.post("/v1/models/m/outcomes", json=body).json()
    statuses = [row["status"] for row in answer["results"]]
    assert statuses == ["counted", "unknown", "invalid", "repeat", "unknown", "invalid"]
    assert "0..2" in answer["results"][2]["detail"]
    assert (answer["counted"], answer["unknown"], answer["invalid"], answer["repeat"]) == (1, 2, 2, 1)
    repeat = client.post("/v1/models/m/outcomes", json={"prediction_ids": [ids[0]], "labels": [1]}).json()
    assert repeat["results"][0]["status"] == "repeat"
    assert client.get("/v1/models/m/monitoring").json()["figures"]["n"] == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prediction_ids": ["a"], "labels": [0, 1]}, 400, "labels"),
        ({"prediction_ids": [], "labels": []}, 400, "prediction_ids"),
        ({"labels": [0]}, 400, "body"),
        ({"prediction_ids": ["a"], "logits": [[1, 2, 3]], "labels": [0]}, 400, "body"),
        ({"logits": [[1, 2]], "labels": [0]}, 400, "logits"),
        ({"logits": [[1, 2, 3]], "labels": [5]}, 400, "labels"),
        ({"logits": [[1, 2, 3]], "labels": [0], "calibrator_version": 9}, 404, None),
        ({"prediction_ids": ["a"] * 1001, "labels": [0] * 1001}, 422, "labels"),
        ({"logits": [[1.0, 2.0, 3.0]] * 1001, "labels": [0] * 1001}, 422, "labels"),
        ({"prediction_ids": "a", "labels": [0]}, 422, "prediction_ids"),
    ],
)
def test_bad_outcome_calls_are_a_4xx_naming_the_problem(client, body, status, field):
    answer = client.post("/v1/models/m/outcomes", json=body)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    if field is not None:
        assert any(error["field"] == field for error in answer.json().get("errors", [])), answer.json()
    assert client.get("/v1/models/m/monitoring").json()["figures"]["n"] == 0  # nothing counted


def test_outcomes_by_logits_are_scored_with_the_named_version_and_logged_for_refits(client):
    z = logits(300, seed=3)
    y = np.array([np.random.default_rng(4).choice(3, p=np.exp(r / 2) / np.exp(r / 2).sum()) for r in z])
    fit = client.post(
        "/v1/models/m/fit", json={"logits": z[:100].tolist(), "labels": y[:100].tolist()}
    ).json()
    answer = client.post(
        "/v1/models/m/outcomes",
        json={"logits": z[100:].tolist(), "labels": y[100:].tolist(), "calibrator_version": 1},
    ).json()
    assert answer["counted"] == 200 and answer["results"][0]["prediction_id"].endswith(".0")
    report = client.get("/v1/models/m/monitoring", params={"window": "15m"}).json()
    probabilities = client.post("/v1/models/m/calibrate", json={"logits": z[100:].tolist()}).json()[
        "probabilities"
    ]
    metrics = client.post(
        "/v1/metrics", json={"probabilities": probabilities, "labels": y[100:].tolist(), "losses": False}
    ).json()
    assert report["figures"]["ece"] == pytest.approx(metrics["ece"], rel=1e-9)
    assert report["drift"]["checks"][0]["baseline"] == pytest.approx(fit["fit"]["after"]["ece"])
    refit = client.post("/v1/models/m/refit", json={"window": "1h", "holdout": 0.25, "activate": False})
    assert refit.status_code == 201, refit.text
    assert refit.json()["n_fit"] + refit.json()["n_holdout"] == 200
    assert refit.json()["activated"] is False
    assert client.get("/v1/models/m").json()["active_calibrator"]["version"] == 1


@pytest.mark.parametrize("window", ["5x", "0h", "1.5h", "", "9999999d", "h"])
def test_a_window_that_parses_to_nothing_is_a_422(client, window):
    answer = client.get("/v1/models/m/monitoring", params={"window": window})
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == "window"


def test_a_refit_without_outcomes_or_with_a_bad_activate_is_refused(client):
    assert client.post("/v1/models/m/refit", json={"window": "1h"}).status_code == 404
    assert client.post("/v1/models/m/refit", json={"activate": "maybe"}).status_code == 422
    assert client.post("/v1/models/m/refit", json={"holdout": 1.0}).status_code == 422
    assert client.get("/v1/models/nosuch/monitoring").status_code == 404


def test_concurrent_posts_of_the_same_ids_to_two_workers_count_each_once(tmp_path):
    env = {"CALIBSERVE_PREDICTION_LOG": "on"}
    models = tmp_path / "models"
    models.mkdir()
    with Server(tmp_path / "store", models=models, workers=2, env=env) as server, server.client() as http:
        assert http.put("/v1/models/m", json={"num_classes": 3}).status_code == 201
        z = logits(400, seed=7)
        ids = http.post("/v1/models/m/calibrate", json={"logits": z.tolist()}).json()["prediction_ids"]
        labels = (np.arange(400) % 3).tolist()
        counted: list[int] = []

        def post(order):
            with server.client() as own:  # a connection of its own: spread over the workers
                body = {"prediction_ids": [ids[i] for i in order], "labels": [labels[i] for i in order]}
                answer = own.post("/v1/models/m/outcomes", json=body)
                assert answer.status_code == 200, answer.text
                counted.append(answer.json()["counted"])

        orders = [np.random.default_rng(seed).permutation(400) for seed in range(8)]
        threads = [threading.Thread(target=post, args=(order,)) for order in orders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(counted) == 400, counted
        assert http.get("/v1/models/m/monitoring").json()["figures"]["n"] == 400


def test_an_unusable_monitoring_database_costs_the_gauges_not_the_service(tmp_path):
    """/metrics and calibrate keep answering when the monitoring database cannot be opened (a read-only
    volume, here a directory where its file should be); outcomes say why with a 503."""
    store = tmp_path / "store"
    (store / "monitoring.sqlite3").mkdir(parents=True)
    settings = Settings(models_dir=None, store_dir=store, prediction_log="on")
    with TestClient(create_app(settings)) as http:
        assert http.put("/v1/models/m", json={"num_classes": 3}).status_code == 201
        answer = http.post("/v1/models/m/calibrate", json={"logits": logits(2).tolist()})
        assert answer.status_code == 200
        assert http.get("/metrics").status_code == 200
        refused = http.post(
            "/v1/models/m/outcomes",
            json={"prediction_ids": answer.json()["prediction_ids"], "labels": [0, 1]},
        )
        assert refused.status_code == 503
        assert "monitoring database" in refused.json()["detail"]


def test_outcomes_wait_for_the_prediction_log_only_until_it_is_written(client):
    """An outcome call flushes the log first: the rows an answer just logged are found at once, whether this
    call or the writer thread's group in progress writes them."""
    for seed in range(3):
        ids = client.post("/v1/models/m/calibrate", json={"logits": logits(2, seed).tolist()}).json()[
            "prediction_ids"
        ]
        assert (
            client.post("/v1/models/m/outcomes", json={"prediction_ids": ids, "labels": [0, 1]}).json()[
                "counted"
            ]
            == 2
        )
    assert client.get("/v1/models/m/monitoring").json()["figures"]["n"] == 6
