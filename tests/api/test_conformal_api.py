"""Conformal prediction sets over HTTP (issue #16): a fit body's ``conformal`` object stores the threshold in
the version; calibrate, predict and the Open Inference Protocol answer the sets; evaluate reports coverage."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service import workflows
from service.core import conformal


def _fit(client, data, **fields):
    body = {
        "logits": data["logits_val"][:2000].tolist(),
        "labels": data["labels_val"][:2000].tolist(),
        **fields,
    }
    return client.post("/v1/models/wrn/fit", json=body)


def test_fit_stores_the_threshold_and_calibrate_answers_the_sets(cifar_model, cifar10):
    client = cifar_model
    answer = _fit(client, cifar10, conformal={"score": "aps", "alpha": 0.1, "randomized": False})
    assert answer.status_code == 201, answer.text
    document = answer.json()
    block = document["conformal"]
    assert block["score"] == "aps" and block["alpha"] == 0.1 and block["fraction"] == 0.5
    assert "ceil((n + 1) * (1 - alpha))" in block["quantile"]
    assert block["n"] + document["fit"]["n"] == 2000
    # the same document fitted locally: the same threshold (the split and the fit are deterministic)
    local = workflows.fit_conformal_document(
        cifar10["logits_val"][:2000], cifar10["labels_val"][:2000], conformal={"score": "aps"}, model="wrn"
    )
    assert block["threshold"] == pytest.approx(local["conformal"]["threshold"], rel=1e-12)

    test = cifar10["logits_test"][:300]
    calibrated = client.post("/v1/models/wrn/calibrate", json={"logits": test.tolist()})
    assert calibrated.status_code == 200, calibrated.text
    body = calibrated.json()
    assert body["alpha"] == 0.1
    fitted = workflows.load_conformal(document)
    expected = conformal.set_lists(conformal.prediction_sets(np.asarray(body["probabilities"]), fitted))
    assert body["prediction_sets"] == expected
    assert all(body["predicted_class"][i] in body["prediction_sets"][i] for i in range(len(test)))

    # the Open Inference Protocol: a [N, K] UINT8 output by default, alpha in the parameters
    v2 = client.post(
        "/v2/models/wrn/infer",
        json={
            "inputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": list(test.shape),
                    "data": test.ravel().tolist(),
                }
            ]
        },
    )
    assert v2.status_code == 200, v2.text
    outputs = {item["name"]: item for item in v2.json()["outputs"]}
    sets = outputs["prediction_sets"]
    assert sets["datatype"] == "UINT8" and sets["shape"] == [300, 10]
    assert conformal.set_lists(np.asarray(sets["data"]).reshape(300, 10).astype(bool)) == expected
    assert v2.json()["parameters"]["alpha"] == 0.1
    metadata = client.get("/v2/models/wrn").json()
    assert metadata["outputs"][-1] == {"name": "prediction_sets", "datatype": "UINT8", "shape": [-1, 10]}

    # evaluate: coverage and set sizes of the version's sets on labelled rows
    report = client.post(
        "/v1/models/wrn/evaluate",
        json={"logits": cifar10["logits_test"].tolist(), "labels": cifar10["labels_test"].tolist()},
    )
    assert report.status_code == 200, report.text
    figures = report.json()["conformal"]
    assert figures["coverage"] >= 0.88 and len(figures["coverage_per_class"]) == 10
    assert sum(figures["set_size_counts"]) == 5000
    assert sum(item["n"] for item in figures["size_stratified_coverage"]) == 5000


def test_a_version_without_sets_answers_none_and_refuses_the_output(cifar_model, cifar10):
    client = cifar_model
    assert _fit(client, cifar10).status_code == 201
    body = client.post(
        "/v1/models/wrn/calibrate", json={"logits": cifar10["logits_test"][:5].tolist()}
    ).json()
    assert "prediction_sets" not in body and "alpha" not in body
    v2 = client.post(
        "/v2/models/wrn/infer",
        json={
            "inputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [0.0] * 10}],
            "outputs": [{"name": "prediction_sets"}],
        },
    )
    assert v2.status_code == 400 and "no conformal prediction sets" in v2.json()["error"]


def test_randomised_sets_follow_the_request_seed(cifar_model, cifar10):
    client = cifar_model
    answer = _fit(
        client, cifar10, conformal={"score": "raps", "randomized": True, "k_reg": 2, "lambda": 0.05}
    )
    assert answer.status_code == 201, answer.text
    logits = cifar10["logits_test"][:400].tolist()
    first = client.post("/v1/models/wrn/calibrate", json={"logits": logits, "seed": 3}).json()
    again = client.post("/v1/models/wrn/calibrate", json={"logits": logits, "seed": 3}).json()
    other = client.post("/v1/models/wrn/calibrate", json={"logits": logits, "seed": 4}).json()
    assert first["prediction_sets"] == again["prediction_sets"] != other["prediction_sets"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"conformal": {"score": "lac", "alpha": 1.5}}, "conformal.alpha must be a number in (0, 1)"),
        ({"conformal": {"score": "top_k"}}, "conformal.score must be one of lac, aps, raps"),
        ({"conformal": {"score": "lac", "alpha": 0.0001}}, "alpha=0.0001 needs at least 9999"),
        (
            {"conformal": {"score": "lac", "mondrian": True, "alpha": 0.01}},
            "class 0's calibration rows (mondrian)",
        ),
        ({"conformal": {"score": "lac", "k_reg": 2}}, "conformal.k_reg is a raps option"),
        (
            {"conformal": {"score": "lac"}, "conformal_fraction": 1.0},
            "conformal_fraction must be a number in [0, 1)",
        ),
        ({"conformal_fraction": 0.3}, "conformal_fraction goes with conformal"),
    ],
)
def test_bad_conformal_options_are_clear_errors(cifar_model, cifar10, fields, needle):
    answer = _fit(cifar_model, cifar10, **fields)
    assert answer.status_code in (400, 422), answer.text
    assert needle in answer.json()["detail"], answer.json()["detail"]


def test_the_npz_fit_body_takes_conformal_as_a_query_parameter(cifar_model, cifar10):
    buffer = io.BytesIO()
    np.savez(buffer, logits=cifar10["logits_val"][:1000], labels=cifar10["labels_val"][:1000])
    answer = cifar_model.post(
        '/v1/models/wrn/fit?conformal={"score":"lac","alpha":0.2}&conformal_fraction=0.4',
        content=buffer.getvalue(),
        headers={"content-type": "application/x-npz"},
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["conformal"]["alpha"] == 0.2 and answer.json()["conformal"]["fraction"] == 0.4
    assert abs(answer.json()["conformal"]["n"] - 400) <= 10  # per class: round(0.4 * n_class)


def test_an_uploaded_document_serves_its_sets_and_a_malformed_block_is_refused(cifar_model, cifar10):
    document = workflows.fit_conformal_document(
        cifar10["logits_val"][:1000],
        cifar10["labels_val"][:1000],
        conformal={"score": "lac", "alpha": 0.2, "mondrian": True},
        model="wrn",
    )
    broken = {**document, "conformal": {**document["conformal"], "thresholds": [0.5] * 3}}
    refused = cifar_model.post("/v1/models/wrn/calibrators", json=broken)
    assert refused.status_code == 422 and "one threshold per class (10)" in refused.json()["detail"]
    stored = cifar_model.post("/v1/models/wrn/calibrators", json=document)
    assert stored.status_code == 201, stored.text
    body = cifar_model.post(
        "/v1/models/wrn/calibrate", json={"logits": cifar10["logits_test"][:50].tolist()}
    ).json()
    fitted = workflows.load_conformal(document)
    assert fitted.thresholds is not None and body["alpha"] == 0.2
    probabilities = np.asarray(body["probabilities"])
    assert body["prediction_sets"] == conformal.set_lists(conformal.prediction_sets(probabilities, fitted))


def test_predict_through_a_torchscript_model_answers_sets(client, digits):
    """The shipped digits MLP: fit on its inputs with LAC sets, predict answers the sets of the
    probabilities it answers."""
    validation, test = digits["validation"], digits["test"]
    body = {
        "inputs": validation["inputs"].tolist(),
        "labels": validation["labels"].tolist(),
        "conformal": {"score": "lac", "alpha": 0.2},
    }
    fitted = client.post("/v1/models/digits-mlp/fit", json=body)
    assert fitted.status_code == 201, fitted.text
    answer = client.post(
        "/v1/models/digits-mlp/predict", json={"inputs": test["inputs"][:40].tolist()}
    ).json()
    thresholds = workflows.load_conformal(fitted.json())
    expected = conformal.prediction_sets(np.asarray(answer["probabilities"]), thresholds)
    assert answer["prediction_sets"] == conformal.set_lists(expected) and answer["alpha"] == 0.2


def test_evaluate_fits_sets_on_part_of_the_rows_when_asked(cifar_model, cifar10):
    """A version without sets (here: none at all, the plain softmax) and an evaluation that asks for them: the
    threshold from half the rows, the coverage of the other half, as the library computes it."""
    logits, labels = cifar10["logits_test"], cifar10["labels_test"]
    body = {"logits": logits.tolist(), "labels": labels.tolist(), "conformal": {"score": "lac", "alpha": 0.1}}
    answer = cifar_model.post("/v1/models/wrn/evaluate", json=body)
    assert answer.status_code == 200, answer.text
    figures = answer.json()["conformal"]
    assert figures["source"] == "asked" and figures["n"] + figures["n_threshold"] == 5000
    local = workflows.evaluate(logits, labels, conformal={"score": "lac", "alpha": 0.1})["conformal"]
    assert figures["threshold"] == pytest.approx(local["threshold"], rel=1e-12)
    assert figures["coverage"] == local["coverage"] and figures["coverage"] == pytest.approx(0.9, abs=0.02)
    bad = cifar_model.post("/v1/models/wrn/evaluate", json={**body, "conformal_fraction": 0})
    assert bad.status_code == 422 and "above 0 in an evaluation" in bad.json()["detail"]


@pytest.mark.parametrize(
    "options",
    [
        {"score": "lac", "mondrian": True, "alpha": 0.2},
        {"score": "aps"},
        {"score": "raps", "k_reg": 2, "lambda": 0.05},
        {"score": "raps", "randomized": True},
    ],
    ids=["lac-mondrian", "aps", "raps", "raps-randomised"],
)
def test_the_exported_file_answers_the_services_sets(cifar_model, cifar10, options):
    """The TorchScript export of a version with sets has a method ``prediction_sets(inputs, u=None)``: the
    sets the service answers (randomised ones with the same uniforms)."""
    torch = pytest.importorskip("torch")
    fitted = _fit(cifar_model, cifar10, conformal=options)
    assert fitted.status_code == 201, fitted.text
    response = cifar_model.get("/v1/models/wrn/export", params={"format": "torchscript"})
    assert response.status_code == 200, response.text
    module = torch.jit.load(io.BytesIO(response.content), map_location="cpu")
    logits = cifar10["logits_test"].astype(np.float64)
    u = np.random.default_rng(5).uniform(size=len(logits))
    thresholds = workflows.load_conformal(fitted.json())
    probabilities = workflows.load_calibrator(fitted.json()).transform(logits)
    expected = conformal.prediction_sets(
        probabilities, thresholds, u=u if thresholds.spec.randomized else None
    )
    exported = module.prediction_sets(torch.as_tensor(logits), torch.as_tensor(u)).numpy()
    np.testing.assert_array_equal(exported, expected)
    np.testing.assert_allclose(module(torch.as_tensor(logits)).numpy(), probabilities, rtol=1e-12, atol=1e-15)
