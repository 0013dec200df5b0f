"""GET /v1/models/{name}/calibrators/{version}/diagram: a version's reliability diagram on its fit data, drawn
from the bins the version stores (no data sent), by the CLI's figure; 404 where there are none."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service import workflows
from service.core import metrics
from service.plots import reliability_diagram
from tests.helpers.problems import assert_problem

READ_KEY = "rd-secret"


def fitted(client, cifar10, method: str = "temperature") -> tuple[dict, np.ndarray, np.ndarray]:
    logits, labels = cifar10["logits_val"][:2000], cifar10["labels_val"][:2000]
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "method": method}
    answer = client.post("/v1/models/wrn/fit", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json(), logits, labels


@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_a_fitted_versions_diagram_is_the_cli_figure_of_its_fit_data(cifar_model, cifar10, method):
    document, logits, labels = fitted(cifar_model, cifar10, method)
    answer = cifar_model.get("/v1/models/wrn/calibrators/1/diagram")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/svg+xml"
    svg = answer.text
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "Version 1 on its fit data (n = 2000, 15 equal-width bins)" in svg
    # the legend's ECE is that of the fit data, computed here from the data, and the stored figure's
    probabilities = workflows.load_calibrator(document).transform(logits)
    after = metrics.reliability_bins(probabilities, labels)
    before = metrics.reliability_bins(logits, labels, from_logits=True)
    legend = dict(re.findall(r"(before|after) calibration \(ECE = ([0-9.]+)\)", svg))
    assert legend == {"before": f"{before.ece:.4f}", "after": f"{after.ece:.4f}"}
    assert legend["after"] == f"{document['fit']['after']['ece']:.4f}"
    # the same drawing code as `calibserve evaluate --plot`: the bytes equal its figure of the stored bins
    report = workflows.stored_reliability(document)
    assert svg.encode() == reliability_diagram(report, format="svg", title="Version 1 on its fit data")


def test_no_version_or_no_stored_bins_is_a_404_problem(cifar_model, cifar10):
    assert_problem(cifar_model.get("/v1/models/wrn/calibrators/1/diagram"), 404, "no calibrator version 1")
    assert_problem(cifar_model.get("/v1/models/nope/calibrators/1/diagram"), 404)
    document, _, _ = fitted(cifar_model, cifar10)
    old = {key: value for key, value in document.items() if key not in ("model", "version")}
    old["fit"] = {key: value for key, value in document["fit"].items() if key != "reliability"}
    uploaded = cifar_model.post("/v1/models/wrn/calibrators", json=old)
    assert uploaded.status_code == 201 and "reliability" not in uploaded.json()["fit"]
    body = assert_problem(
        cifar_model.get("/v1/models/wrn/calibrators/2/diagram"), 404, "stores no reliability bins"
    )
    assert "evaluate/diagram?version=2" in body["detail"]
    assert_problem(cifar_model.get("/v1/models/wrn/calibrators/x/diagram"), 422, "calibrator version")


def test_an_uploaded_document_keeps_its_bins_and_malformed_bins_are_refused(cifar_model, cifar10):
    document, _, _ = fitted(cifar_model, cifar10)
    copy = {key: value for key, value in document.items() if key not in ("model", "version")}
    uploaded = cifar_model.post("/v1/models/wrn/calibrators", json=copy).json()
    assert uploaded["version"] == 2 and uploaded["fit"]["reliability"] == document["fit"]["reliability"]
    first, second = (cifar_model.get(f"/v1/models/wrn/calibrators/{v}/diagram").text for v in (1, 2))
    assert first.replace("Version 1", "Version 2") == second
    broken = {**copy, "fit": {**copy["fit"], "reliability": {**copy["fit"]["reliability"], "n_bins": 10}}}
    refused = cifar_model.post("/v1/models/wrn/calibrators", json=broken)
    assert_problem(refused, 400, "fit.reliability.before.counts must be a list of 10 values")
    assert [item["version"] for item in cifar_model.get("/v1/models/wrn/calibrators").json()["items"]] == [
        2,
        1,
    ]


def test_the_diagram_needs_only_a_read_key(make_client, cifar10):
    client = make_client(api_keys=f"adm-secret:admin,{READ_KEY}:read")
    admin = {"X-API-Key": "adm-secret"}
    assert client.put("/v1/models/wrn", json={"num_classes": 10}, headers=admin).status_code == 201
    logits, labels = cifar10["logits_val"][:300], cifar10["labels_val"][:300]
    body = {"logits": logits.tolist(), "labels": labels.tolist()}
    assert client.post("/v1/models/wrn/fit", json=body, headers=admin).status_code == 201
    assert_problem(client.get("/v1/models/wrn/calibrators/1/diagram"), 401)
    answer = client.get("/v1/models/wrn/calibrators/1/diagram", headers={"X-API-Key": READ_KEY})
    assert answer.status_code == 200 and "n = 300" in answer.text
