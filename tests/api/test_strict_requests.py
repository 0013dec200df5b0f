"""v1 request bodies are strict (issue #11): no ``true`` for 1, no ``"3"`` for 3, no ``"yes"`` for true,
integer labels only, bounded class names; ``.npz`` bodies still take their scalar fields from the query."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service import workflows
from service.api.schemas import MAX_CLASS_NAME_LENGTH
from tests.helpers.problems import assert_problem

NPZ = {"content-type": "application/x-npz"}
LOGITS = [[2.0, 0.0, -1.0], [0.0, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]]


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
def three(client):
    assert client.put("/v1/models/m", json={"num_classes": 3}).status_code == 201
    return client


@pytest.mark.parametrize("num_classes", [True, "3", 3.0])
def test_num_classes_must_be_an_integer(client, num_classes):
    assert_problem(client.put("/v1/models/m", json={"num_classes": num_classes}), 422, "num_classes")
    assert client.get("/v1/models/m").status_code == 404


@pytest.mark.parametrize(
    ("field", "value"),
    [("activate", "yes"), ("activate", 1), ("method", 1), ("options", "{}")],
)
def test_fit_scalars_are_not_coerced(three, field, value):
    body = {"logits": LOGITS, "labels": [0, 1, 2, 0], field: value}
    assert_problem(three.post("/v1/models/m/fit", json=body), 422, field)
    assert three.get("/v1/models/m/calibrators").json()["items"] == []


@pytest.mark.parametrize(
    ("field", "value"), [("n_bins", "10"), ("n_bins", True), ("bootstrap", True), ("seed", "1")]
)
def test_evaluate_and_metrics_scalars_are_not_coerced(three, field, value):
    body = {"logits": LOGITS, "labels": [0, 1, 2, 0], field: value}
    assert_problem(three.post("/v1/models/m/evaluate", json=body), 422, field)
    assert_problem(three.post("/v1/metrics", json=body), 422, field)
    losses = three.post("/v1/metrics", json={"logits": LOGITS, "labels": [0, 1, 2, 0], "losses": "no"})
    assert_problem(losses, 422, "losses")


@pytest.mark.parametrize("labels", [[True, False, True, False], [0, 1, True, 0]])
def test_boolean_labels_are_refused(three, labels):
    body = {"logits": [row[:2] for row in LOGITS], "labels": labels}
    assert_problem(three.post("/v1/metrics", json=body), 400, "boolean")
    assert_problem(three.post("/v1/models/m/fit", json={"logits": LOGITS, "labels": labels}), 400, "boolean")


def test_class_names_are_bounded(client):
    long_name = "x" * (MAX_CLASS_NAME_LENGTH + 1)
    assert_problem(
        client.put("/v1/models/m", json={"num_classes": 2, "class_names": ["cat", long_name]}),
        422,
        "class_names",
    )
    assert_problem(
        client.put("/v1/models/m", json={"num_classes": 2, "class_names": ["cat", ""]}), 422, "class_names"
    )
    assert_problem(
        client.put("/v1/models/m", json={"num_classes": 2, "class_names": ["cat", 7]}), 422, "class_names"
    )
    ok = client.put(
        "/v1/models/m", json={"num_classes": 2, "class_names": ["cat", "d" * MAX_CLASS_NAME_LENGTH]}
    )
    assert ok.status_code == 201, ok.text  # created


def test_npz_query_scalars_are_converted_before_the_strict_check(three):
    arrays = npz(logits=np.array(LOGITS, dtype=np.float32), labels=np.array([0, 1, 2, 0]))
    fitted = three.post("/v1/models/m/fit?activate=false&method=temperature", content=arrays, headers=NPZ)
    assert fitted.status_code == 201, fitted.text
    assert three.get("/v1/models/m").json()["active_calibrator"] is None  # activate=false held
    activated = three.post("/v1/models/m/fit?activate=True", content=arrays, headers=NPZ)
    assert activated.status_code == 201, activated.text
    assert three.get("/v1/models/m").json()["active_calibrator"]["version"] == activated.json()["version"]
    report = three.post("/v1/models/m/evaluate?n_bins=7&bootstrap=20&seed=3", content=arrays, headers=NPZ)
    assert report.status_code == 200, report.text
    assert report.json()["conventions"]["n_bins"] == 7
    assert report.json()["conventions"]["bootstrap"]["seed"] == 3
    figures = three.post("/v1/metrics?losses=false", content=arrays, headers=NPZ)
    assert figures.status_code == 200 and "losses" not in figures.json()
    # text that is no boolean or integer is still refused, as in JSON
    assert_problem(three.post("/v1/models/m/fit?activate=yes", content=arrays, headers=NPZ), 422, "activate")
    assert_problem(three.post("/v1/metrics?n_bins=ten", content=arrays, headers=NPZ), 422, "n_bins")
    assert_problem(three.post("/v1/metrics?n_bins=1.5", content=arrays, headers=NPZ), 422, "n_bins")
    boolean_labels = npz(
        logits=np.array(LOGITS, dtype=np.float32)[:, :2], labels=np.array([True, False, True, False])
    )
    assert_problem(three.post("/v1/metrics", content=boolean_labels, headers=NPZ), 400, "boolean")


def test_accuracy_drift_is_labelled_as_a_decrease():
    report = {"uncalibrated": {"accuracy": 0.80, "ece": 0.05}}
    baseline = {"uncalibrated": {"accuracy": 0.90, "ece": 0.04}}
    accuracy, ece = workflows.check_drift(report, baseline, {"accuracy": 0.001, "ece": 0.02})
    assert accuracy["name"] == "accuracy decrease <= 0.001" and accuracy["op"] == "decrease>"
    assert accuracy["change"] == pytest.approx(0.10) and accuracy["status"] == "fail"
    assert ece["name"] == "ece increase <= 0.02" and ece["op"] == "increase>" and ece["status"] == "pass"
