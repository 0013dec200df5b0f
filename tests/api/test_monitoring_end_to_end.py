"""Watching calibration in production, end to end, with a real server on real data (CIFAR-10 WRN logits):
fit on the validation split, serve the test split, post delayed labels by prediction id, see the drift state
flip when the traffic shifts, refit from the logged outcomes, activate, and see it recover; the server is
SIGKILLed and restarted in the middle, and no acknowledged outcome is lost or counted twice."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from tests.helpers.servers import Server

SHIFT = (
    2.5  # the shifted traffic's logits are 2.5 times larger: over-confident against the fitted temperature
)
ENV = {
    "CALIBSERVE_PREDICTION_LOG": "on",
    "CALIBSERVE_MONITORING_MIN_OUTCOMES": "200",
    "CALIBSERVE_MONITORING_DRIFT": "ece+0.03",
    "CALIBSERVE_MONITORING_WINDOWS": "1h",
}


def calibrate(http, logits):
    answer = http.post("/v1/models/wrn/calibrate", json={"logits": np.asarray(logits).tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["prediction_ids"]) == len(logits)
    return body


def post_labels(http, ids, labels):
    answer = http.post(
        "/v1/models/wrn/outcomes", json={"prediction_ids": list(ids), "labels": labels.tolist()}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def monitoring(http, **params):
    answer = http.get("/v1/models/wrn/monitoring", params={"window": "1h", **params})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_drift_flips_on_shifted_traffic_and_a_refit_from_outcomes_recovers_it(cifar10, tmp_path):
    z, y = np.asarray(cifar10["logits_test"], np.float64), np.asarray(cifar10["labels_test"])
    store, models = tmp_path / "store", tmp_path / "models"
    models.mkdir()
    server = Server(store, models=models, env=ENV)
    try:
        with server.client() as http:
            assert http.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
            fitted = http.post(
                "/v1/models/wrn/fit",
                json={"logits": cifar10["logits_val"].tolist(), "labels": cifar10["labels_val"].tolist()},
            )
            assert fitted.status_code == 201
            fit_ece = fitted.json()["fit"]["after"]["ece"]

            # unshifted traffic, labels a while later: calibrated as at fit time
            first = calibrate(http, z[:500])
            assert post_labels(http, first["prediction_ids"], y[:500])["counted"] == 500
            report = monitoring(http)
            assert report["figures"]["n"] == 500
            assert report["drift"]["state"] == "ok", report["drift"]
            # the window is exactly these rows: its figures are /v1/metrics' on the same answers
            metrics = http.post(
                "/v1/metrics",
                json={"probabilities": first["probabilities"], "labels": y[:500].tolist(), "losses": False},
            ).json()
            for key in ("ece", "mce", "brier", "nll", "accuracy"):
                assert report["figures"][key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key

            # the traffic shifts; half of its labels arrive, then the server is killed
            shifted = calibrate(http, z[500:3500] * SHIFT)
            ids = shifted["prediction_ids"]
            assert post_labels(http, ids[:1500], y[500:2000])["counted"] == 1500
        assert server.stop(signal.SIGKILL) != 0

        server = Server(store, models=models, env=ENV)
        with server.client() as http:
            again = post_labels(http, ids[:1500], y[500:2000])  # a retry of the acknowledged call
            assert again["repeat"] == 1500 and again["counted"] == 0
            assert post_labels(http, ids[1500:], y[2000:3500])["counted"] == 1500
            report = monitoring(http)
            assert report["figures"]["n"] == 3500  # nothing lost, nothing twice
            assert report["drift"]["state"] == "drift", report["drift"]
            (check,) = report["drift"]["checks"]
            assert check["baseline"] == pytest.approx(fit_ece) and check["change"] > 0.03
            assert report["label_free"]["predictions"] == 3500
            assert report["label_free"]["expected_accuracy"] > report["figures"]["accuracy"]  # over-confident
            drift_series = [
                line
                for line in http.get("/metrics").text.splitlines()
                if line.startswith('calibserve_monitoring_drift{model="wrn",window="1h"}')
            ]
            assert drift_series == ['calibserve_monitoring_drift{model="wrn",window="1h"} 1.0']

            refit = http.post("/v1/models/wrn/refit", json={"window": "1h", "activate": "if_better"})
            assert refit.status_code == 201, refit.text
            refit = refit.json()
            assert refit["activated"] and refit["improves_nll"]
            assert refit["n_fit"] + refit["n_holdout"] == 3500
            assert refit["holdout"]["new"]["nll"] < refit["holdout"]["active"]["nll"]
            new_version = refit["calibrator"]["version"]

            # the shifted traffic goes on, now served by the refitted version
            later = calibrate(http, z[3500:] * SHIFT)
            assert later["calibrator_version"] == new_version
            assert post_labels(http, later["prediction_ids"], y[3500:])["counted"] == 1500
            recovered = monitoring(http)
            assert recovered["calibrator_version"] == new_version
            assert recovered["figures"]["n"] == 1500
            assert recovered["drift"]["state"] == "ok", recovered["drift"]
            old = monitoring(http, calibrator_version=1)
            assert old["figures"]["n"] == 3500 and old["drift"]["state"] == "drift"
    finally:
        server.stop()
