"""Fit, calibrate, versions, activation and rollback through the real app, on real classifier outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from tests.helpers.problems import assert_problem


def fit(client, data, **extra):
    body = {"logits": data["logits_val"].tolist(), "labels": data["labels_val"].tolist(), **extra}
    response = client.post("/v1/models/wrn/fit", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_fit_reproduces_reference_temperature_and_figures(cifar_model, cifar10):
    document = fit(cifar_model, cifar10)
    # shared/data/README.md: T = 2.03915 for this model
    assert document["temperature"] == pytest.approx(2.03915, abs=1e-4)
    assert document["params"]["temperature"] == document["temperature"]
    assert document["version"] == 1 and document["model"] == "wrn" and document["format_version"] == 1
    assert document["num_classes"] == 10 and document["fit"]["n"] == 5000
    before, after = document["fit"]["before"], document["fit"]["after"]
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert len(document["fit"]["data_sha256"]) == 64
    assert cifar_model.get("/v1/models/wrn").json()["active_calibrator"]["version"] == 1


def test_calibrate_answers_softmax_over_temperature(cifar_model, cifar10):
    document = fit(cifar_model, cifar10)
    rows = cifar10["logits_test"][:32]
    response = cifar_model.post("/v1/models/wrn/calibrate", json={"logits": rows.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = softmax(rows.astype(np.float64) / document["temperature"], axis=1)
    np.testing.assert_allclose(body["probabilities"], expected, atol=1e-6)
    assert body["predicted_class"] == rows.argmax(axis=1).tolist()
    assert body["calibrator_version"] == 1


def test_versions_activate_rollback_and_pin(cifar_model, cifar10):
    first = fit(cifar_model, cifar10)
    sharp = {"logits": (cifar10["logits_val"] * 3).tolist(), "labels": cifar10["labels_val"].tolist()}
    second = cifar_model.post("/v1/models/wrn/fit", json={**sharp, "activate": False}).json()
    assert second["version"] == 2 and second["temperature"] > first["temperature"] * 2.5
    rows = cifar10["logits_test"][:4].tolist()

    def served(**params):
        return cifar_model.post("/v1/models/wrn/calibrate", json={"logits": rows}, params=params).json()

    assert served()["calibrator_version"] == 1  # staged, not active
    assert served(version=2)["calibrator_version"] == 2
    listing = cifar_model.get("/v1/models/wrn/calibrators").json()
    assert [item["version"] for item in listing["items"]] == [2, 1] and listing["active_version"] == 1
    assert cifar_model.post("/v1/models/wrn/calibrators/2/activate").status_code == 200
    assert served()["calibrator_version"] == 2
    assert_problem(cifar_model.delete("/v1/models/wrn/calibrators/2"), 409, "active")
    assert cifar_model.post("/v1/models/wrn/calibrators/1/activate").status_code == 200
    assert cifar_model.delete("/v1/models/wrn/calibrators/2").status_code == 204
    assert_problem(cifar_model.get("/v1/models/wrn/calibrators/2"), 404)
    third = fit(cifar_model, cifar10)
    assert third["version"] == 3  # numbers are never reused
    assert_problem(cifar_model.post("/v1/models/wrn/calibrators/99/activate"), 404)


def test_uploaded_document_round_trips(cifar_model, cifar10):
    document = fit(cifar_model, cifar10)
    exported = cifar_model.get("/v1/models/wrn/calibrators/1").json()
    assert exported == document
    uploaded = cifar_model.post("/v1/models/wrn/calibrators", content=json.dumps(exported))
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["version"] == 2 and uploaded.json()["temperature"] == document["temperature"]
    broken = {**exported, "temperature": -1.0, "params": {"temperature": -1.0}}
    assert_problem(cifar_model.post("/v1/models/wrn/calibrators", json=broken), 400)
    wrong_k = {**exported, "num_classes": 3}
    assert cifar_model.post("/v1/models/wrn/calibrators", json=wrong_k).status_code == 400


@pytest.mark.parametrize("method", ["temperature", "vector", "matrix", "isotonic", "histogram"])
def test_every_multiclass_method_fits_and_serves(cifar_model, cifar10, method):
    n = 1500
    body = {
        "logits": cifar10["logits_val"][:n].tolist(),
        "labels": cifar10["labels_val"][:n].tolist(),
        "method": method,
    }
    response = cifar_model.post("/v1/models/wrn/fit", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["method"] == method
    served = cifar_model.post(
        "/v1/models/wrn/calibrate", json={"logits": cifar10["logits_test"][:8].tolist()}
    )
    probabilities = np.array(served.json()["probabilities"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)


def test_binary_platt_on_one_logit_column(client):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    logits = (labels * 2.0 - 1.0 + rng.normal(0, 1.5, 400))[:, None] * 4
    assert client.put("/v1/models/bin", json={"num_classes": 1}).status_code == 201
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "method": "platt"}
    assert client.post("/v1/models/bin/fit", json=body).status_code == 201
    served = client.post("/v1/models/bin/calibrate", json={"logits": [[0.0], [8.0]]}).json()
    assert np.array(served["probabilities"]).shape == (2, 2)


@pytest.mark.parametrize(("method", "columns"), [("beta", 1), ("ensemble_temperature", 10)])
def test_new_methods_fit_serve_and_export_over_http(client, method, columns):
    from service.core.calibrators import calibrator_from_dict

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, size=(600, columns))
    labels = (
        (rng.random(600) < 1 / (1 + np.exp(-0.4 * logits[:, 0]))).astype(int)
        if columns == 1
        else rng.integers(0, columns, 600)
    )
    assert client.put("/v1/models/fresh", json={"num_classes": columns}).status_code == 201
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "method": method}
    answer = client.post("/v1/models/fresh/fit", json=body)
    assert answer.status_code == 201, answer.text
    document = answer.json()
    assert document["method"] == method
    served = client.post("/v1/models/fresh/calibrate", json={"logits": logits[:5].tolist()}).json()
    np.testing.assert_allclose(
        served["probabilities"], calibrator_from_dict(document).transform(logits[:5]), rtol=1e-12, atol=1e-15
    )
    bad = client.post("/v1/models/fresh/fit", json={**body, "options": {"parameters": "xyz"}})
    assert bad.status_code == 422 and "parameters" in bad.json()["detail"]


def test_calibrate_without_a_calibrator_is_plain_softmax(cifar_model, cifar10):
    rows = cifar10["logits_test"][:3]
    body = cifar_model.post("/v1/models/wrn/calibrate", json={"logits": rows.tolist()}).json()
    assert body["calibrator_version"] is None
    np.testing.assert_allclose(body["probabilities"], softmax(rows.astype(np.float64), axis=1), atol=1e-6)


def test_evaluate_reports_before_after_and_drift(cifar_model, cifar10):
    fit(cifar_model, cifar10)
    body = {"logits": cifar10["logits_test"].tolist(), "labels": cifar10["labels_test"].tolist()}
    report = cifar_model.post("/v1/models/wrn/evaluate", json=body).json()
    # shared/data/README.md reference figures on the test half
    assert report["uncalibrated"]["ece"] == pytest.approx(0.055219, abs=1e-6)
    assert report["calibrated"]["ece"] == pytest.approx(0.006447, abs=1e-5)
    assert report["calibrated"]["nll"] == pytest.approx(0.276111, abs=1e-5)
    assert report["drift"]["calibrator_version"] == 1
    assert set(report["drift"]["change"]["calibrated"]) >= {"ece", "nll", "brier"}
    assert report["conventions"]["n_bins"] == 15


def test_stateless_metrics(client, cifar10):
    body = {"logits": cifar10["logits_test"].tolist(), "labels": cifar10["labels_test"].tolist()}
    figures = client.post("/v1/metrics", json=body).json()
    assert figures["ece"] == pytest.approx(0.055219, abs=1e-6)
    assert figures["mce"] == pytest.approx(0.321881, abs=1e-6)
    assert figures["brier"] == pytest.approx(0.145812, abs=1e-6)
    assert figures["nll"] == pytest.approx(0.383129, abs=1e-6)
    assert figures["accuracy"] == pytest.approx(1 - 0.0894, abs=1e-4)
    assert len(figures["reliability"]["counts"]) == 15
    assert {"focal", "soft_f1"} <= set(figures["losses"])
    small = {"probabilities": [[0.9, 0.1], [0.2, 0.8]], "labels": [0, 1], "bootstrap": 50, "losses": False}
    answer = client.post("/v1/metrics", json=small).json()
    low, high = answer["intervals"]["ece"]
    assert low <= high


@pytest.mark.parametrize(("declared", "columns"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_binary_models_accept_one_or_two_logit_columns(client, declared, columns):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    margin = (labels * 2.0 - 1.0 + rng.normal(0, 1.0, 200)) * 3
    logits = margin[:, None] if columns == 1 else np.stack([np.zeros(200), margin], axis=1)
    assert client.put("/v1/models/b", json={"num_classes": declared}).status_code == 201
    fitted = client.post("/v1/models/b/fit", json={"logits": logits.tolist(), "labels": labels.tolist()})
    assert fitted.status_code == 201, fitted.text
    served = client.post("/v1/models/b/calibrate", json={"logits": logits[:3].tolist()}).json()
    expected = softmax(np.stack([np.zeros(3), margin[:3]], axis=1) / fitted.json()["temperature"], axis=1)
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-6)
    three = client.post("/v1/models/b/calibrate", json={"logits": [[0.0, 1.0, 2.0]]})
    assert_problem(three, 400, "3 columns")


def test_a_temperature_per_segment_is_fitted_and_served_with_a_segment_per_row(client):
    from service.core.calibrators import calibrator_from_dict

    rng = np.random.default_rng(8)
    n = 3000
    logits = rng.normal(0.0, 3.0, size=(n, 4))
    labels = (logits / 2 + rng.gumbel(size=logits.shape)).argmax(axis=1)
    segments = [("shop" if i % 3 else "app") for i in range(n)]
    logits[np.array(segments) == "app"] *= 3.0  # the app's model is three times over-confident
    assert client.put("/v1/models/seg", json={"num_classes": 4}).status_code == 201
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "method": "segment_temperature"}
    document = client.post("/v1/models/seg/fit", json={**body, "segments": segments}).json()
    temperatures = document["params"]["segment_temperatures"]
    assert temperatures["app"] > 2.5 * temperatures["shop"]  # each segment got its own
    assert document["fit"]["after"]["nll"] < document["fit"]["before"]["nll"]
    rows = logits[:6].tolist()
    keys = ["app", "shop", "never-seen", None, 7, "app"]
    served = client.post("/v1/models/seg/calibrate", json={"logits": rows, "segments": keys}).json()
    assert served["segment_fallback"] == [False, False, True, True, True, False]
    expected, _ = calibrator_from_dict(document).transform_segments(np.array(rows), keys)
    np.testing.assert_allclose(served["probabilities"], expected, rtol=1e-12, atol=1e-15)
    plain = client.post("/v1/models/seg/calibrate", json={"logits": rows}).json()  # no segments: global T
    assert plain["segment_fallback"] == [True] * 6
    np.testing.assert_allclose(
        plain["probabilities"], softmax(np.array(rows) / document["temperature"], axis=1), rtol=1e-12
    )
    # what is refused, and said so
    short = client.post("/v1/models/seg/calibrate", json={"logits": rows, "segments": keys[:2]})
    assert short.status_code == 400 and "one segment per row" in short.json()["detail"]
    wrong = client.post("/v1/models/seg/fit", json={**body, "method": "temperature", "segments": segments})
    assert wrong.status_code == 400 and "segment_temperature" in wrong.json()["detail"]
    assert client.put("/v1/models/flat", json={"num_classes": 4}).status_code == 201
    flat = {"logits": logits.tolist(), "labels": labels.tolist()}
    assert client.post("/v1/models/flat/fit", json=flat).status_code == 201
    refused = client.post("/v1/models/flat/calibrate", json={"logits": rows, "segments": keys})
    assert refused.status_code == 400 and "segment_temperature" in refused.json()["detail"]


@pytest.mark.parametrize("columns", [1, 4])
def test_venn_abers_fits_serves_intervals_on_request_and_refuses_bad_options(client, columns):
    from service.core.calibrators import calibrator_from_dict

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, size=(500, columns))
    if columns == 1:
        labels = (rng.random(500) < 1 / (1 + np.exp(-0.4 * logits[:, 0]))).astype(int)
    else:
        labels = (softmax(0.5 * logits, axis=1).cumsum(axis=1) > rng.random((500, 1))).argmax(axis=1)
    assert client.put("/v1/models/va", json={"num_classes": columns}).status_code == 201
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "method": "venn_abers"}
    answer = client.post("/v1/models/va/fit", json=body)
    assert answer.status_code == 201, answer.text
    document = answer.json()
    assert document["method"] == "venn_abers" and document["convergence"]["converged"]
    fitted = calibrator_from_dict(document)
    queries = logits[:6].tolist()
    plain = client.post("/v1/models/va/calibrate", json={"logits": queries}).json()
    assert "probability_intervals" not in plain
    np.testing.assert_allclose(plain["probabilities"], fitted.transform(logits[:6]), rtol=1e-12)
    for asked in (
        client.post("/v1/models/va/calibrate", json={"logits": queries, "intervals": True}),
        client.post("/v1/models/va/calibrate?intervals=true", json={"logits": queries}),
    ):
        assert asked.status_code == 200, asked.text
        served = asked.json()
        intervals = np.array(served["probability_intervals"])
        assert intervals.shape == (6, max(columns, 2), 2)
        np.testing.assert_allclose(intervals, fitted.transform_intervals(logits[:6]), rtol=1e-12)
        assert (intervals[..., 0] <= intervals[..., 1]).all()
    # the Open Inference Protocol answers them as an output asked for by name: [N, K, 2]
    k = max(columns, 2)
    oip = client.post(
        "/v2/models/va/infer",
        json={
            "inputs": [
                {
                    "name": "logits",
                    "datatype": "FP64",
                    "shape": [6, columns],
                    "data": logits[:6].ravel().tolist(),
                }
            ],
            "outputs": [{"name": "probabilities"}, {"name": "probability_intervals"}],
        },
    )
    assert oip.status_code == 200, oip.text
    by_name = {output["name"]: output for output in oip.json()["outputs"]}
    assert by_name["probability_intervals"]["shape"] == [6, k, 2]
    assert by_name["probability_intervals"]["datatype"] == "FP64"
    np.testing.assert_allclose(
        np.reshape(by_name["probability_intervals"]["data"], (6, k, 2)),
        fitted.transform_intervals(logits[:6]),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        np.reshape(by_name["probabilities"]["data"], (6, k)), fitted.transform(logits[:6]), rtol=1e-12
    )
    # options and requests that cannot be served are refused, naming the field
    bad = client.post("/v1/models/va/fit", json={**body, "options": {"precision": -2}})
    assert bad.status_code == 422 and "precision" in bad.json()["detail"]
    bad = client.post("/v1/models/va/fit", json={**body, "options": {"n_bins": 3}})
    assert bad.status_code == 422 and "n_bins" in bad.json()["detail"]
    bad = client.post("/v1/models/va/calibrate?intervals=maybe", json={"logits": queries})
    assert bad.status_code == 400 and "intervals must be true or false" in bad.json()["detail"]
    npy = client.post(
        "/v1/models/va/calibrate?intervals=true",
        json={"logits": queries},
        headers={"Accept": "application/x-npy"},
    )
    assert npy.status_code == 400 and "JSON only" in npy.json()["detail"]
    fit_temperature = {**body, "method": "temperature"}
    assert client.post("/v1/models/va/fit", json=fit_temperature).status_code == 201
    refused = client.post("/v1/models/va/calibrate", json={"logits": queries, "intervals": True})
    assert refused.status_code == 400
    assert "probability intervals come from a venn_abers calibrator" in refused.json()["detail"]
    refused = client.post(
        "/v2/models/va/infer",
        json={
            "inputs": [{"name": "logits", "datatype": "FP32", "shape": [1, columns], "data": queries[0]}],
            "outputs": [{"name": "probability_intervals"}],
        },
    )
    assert refused.status_code == 400
    assert "venn_abers" in refused.json()["error"]
    pinned = client.post(
        f"/v1/models/va/calibrate?version={document['version']}&intervals=true", json={"logits": queries}
    )
    assert pinned.status_code == 200 and "probability_intervals" in pinned.json()
