"""Multi-label models through a real ``calibserve serve`` process: declaration (``"task": "multilabel"``),
fit (labels as a 0/1 matrix, index lists, or an .npz matrix), calibrate and predict (v1), OIP infer,
evaluate with per-label and macro/micro figures and drift, and the CLI's client mode against it.
Data: the synthetic multi-label set of tests/helpers/multilabel.py."""

from __future__ import annotations

import io

import httpx
import numpy as np
import orjson
import pytest
import torch
from scipy.special import expit

from service import cli, multilabel_workflows
from service.core.calibrators import PerLabelCalibration, calibrator_from_dict
from tests.helpers.multilabel import index_lists, multilabel_set
from tests.helpers.servers import Server
from tests.helpers.torchscript import Linear, scripted


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("multilabel-store")
    with Server(store, grpc=True) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def data():
    logits, labels = multilabel_set(1500, seed=0)
    test_logits, test_labels = multilabel_set(500, seed=1)
    return logits, labels, test_logits, test_labels


@pytest.fixture(scope="module")
def model(http):
    answer = http.put("/v1/models/tags", json={"num_classes": 5, "task": "multilabel"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["task"] == "multilabel"
    return "tags"


def test_without_a_calibrator_the_answer_is_the_sigmoid_of_each_logit(http, model, data):
    logits = data[2][:20]
    answer = http.post(f"/v1/models/{model}/calibrate", json={"logits": logits.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["task"] == "multilabel" and body["calibrator_version"] is None
    np.testing.assert_allclose(body["probabilities"], expit(logits), rtol=1e-12)
    assert body["predicted_labels"] == [np.flatnonzero(row >= 0).tolist() for row in logits]


@pytest.mark.parametrize(
    ("method", "labels_as"),
    [("temperature", "matrix"), ("shared_temperature", "lists"), ("platt", "npz"), ("isotonic", "matrix")],
)
def test_fit_then_calibrate_answers_the_local_calibrator(http, model, data, method, labels_as):
    logits, labels, test_logits, _ = data
    if labels_as == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, logits=logits, labels=labels)
        answer = http.post(
            f"/v1/models/{model}/fit?method={method}",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npz"},
        )
    else:
        sent = labels.tolist() if labels_as == "matrix" else index_lists(labels)
        answer = http.post(
            f"/v1/models/{model}/fit", json={"logits": logits.tolist(), "labels": sent, "method": method}
        )
    assert answer.status_code == 201, answer.text
    document = answer.json()
    assert document["task"] == "multilabel" and document["method"] == method
    fit = document["fit"]
    assert fit["after"]["nll"] < fit["before"]["nll"] and fit["after"]["ece"] < fit["before"]["ece"]
    assert len(fit["after"]["per_label"]) == 5 and {"ece_micro", "nll_micro"} <= set(fit["after"])
    local = PerLabelCalibration(method).fit(logits, labels)
    answer = http.post(f"/v1/models/{model}/calibrate", json={"logits": test_logits.tolist()})
    body = answer.json()
    assert body["calibrator_version"] == document["version"]
    probabilities = np.asarray(body["probabilities"])
    np.testing.assert_allclose(probabilities, local.transform(test_logits), rtol=1e-9, atol=1e-12)
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # K independent answers
    # per-label probabilities in: read as their logits
    by_probability = http.post(
        f"/v1/models/{model}/calibrate", json={"probabilities": expit(test_logits).tolist()}
    )
    np.testing.assert_allclose(by_probability.json()["probabilities"], probabilities, rtol=1e-6, atol=1e-9)


def test_open_inference_protocol_answers_k_probabilities_and_a_0_1_label_tensor(http, model, data):
    logits = data[2][:8]
    request = {
        "inputs": [{"name": "logits", "datatype": "FP64", "shape": [8, 5], "data": logits.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}, {"name": "predicted_class"}],
    }
    answer = http.post(f"/v2/models/{model}/infer", json=request)
    assert answer.status_code == 200, answer.text
    outputs = {output["name"]: output for output in answer.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [8, 5]
    v1 = http.post(f"/v1/models/{model}/calibrate", json={"logits": logits.tolist()}).json()
    np.testing.assert_allclose(
        np.reshape(outputs["probabilities"]["data"], (8, 5)), v1["probabilities"], rtol=1e-12
    )
    chosen = np.reshape(outputs["predicted_class"]["data"], (8, 5))
    assert [np.flatnonzero(row).tolist() for row in chosen] == v1["predicted_labels"]


def test_evaluate_reports_per_label_and_macro_micro_figures_with_drift(http, model, data):
    _, _, test_logits, test_labels = data
    answer = http.post(
        f"/v1/models/{model}/evaluate",
        json={"logits": test_logits.tolist(), "labels": index_lists(test_labels)},
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    document = http.get(f"/v1/models/{model}/calibrators/{report['calibrator']['version']}").json()
    local = multilabel_workflows.evaluate(
        test_logits, test_labels, calibrator=calibrator_from_dict(document), calibrator_document=document
    )
    for group in ("uncalibrated", "calibrated"):
        for name in ("ece", "mce", "brier", "nll", "ece_micro", "nll_micro"):
            assert report[group][name] == pytest.approx(local[group][name], rel=1e-9)
    assert len(report["reliability_per_label"]["calibrated"]) == 5
    assert set(report["drift"]["change"]["calibrated"]) == {"ece", "mce", "brier", "nll"}


def test_bad_requests_are_named(http, model, data):
    logits, labels = data[0][:50], data[1][:50]
    cases = [  # the method and its options are parameters (422); the data, data (400)
        ({"method": "matrix"}, "not available for a multi-label model", 422),
        ({"labels": labels[:, :3].tolist()}, "0/1 matrix of 3 columns; the model has 5 labels", 400),
        ({"labels": [[7]] * 50}, r"labels\[0\] holds label index 7, outside \[0, 5\)", 400),
        ({"options": {"bins": 3}}, "unknown option 'bins' for multi-label method 'temperature'", 422),
        ({"logits": logits[:, :4].tolist()}, "has 5 labels; logits has 4 columns", 400),
    ]
    for change, message, status in cases:
        body = {"logits": logits.tolist(), "labels": labels.tolist(), **change}
        answer = http.post(f"/v1/models/{model}/fit", json=body)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert __import__("re").search(message, answer.json()["detail"]), answer.json()["detail"]
    wrong = http.post(f"/v1/models/{model}/calibrate", json={"logits": logits[:, :4].tolist()})
    assert wrong.status_code == 400 and "has 5 labels" in wrong.text
    multiclass = {
        "method": "temperature",
        "temperature": 1.5,
        "num_classes": 5,
        "params": {"temperature": 1.5},
    }
    refused = http.post(f"/v1/models/{model}/calibrators", json=multiclass)
    assert (
        refused.status_code == 400 and "is multilabel; the calibrator document is multiclass" in refused.text
    )
    bad_task = http.put("/v1/models/other", json={"num_classes": 5, "task": "multi"})
    assert bad_task.status_code == 422


def test_predict_runs_a_torchscript_multilabel_model_then_calibrates_each_label(http):
    upload = http.put(
        "/v1/models/tagger/torchscript",
        content=scripted(Linear(seed=3, n_features=4, n_out=5)),
        headers={
            "content-type": "application/octet-stream",
            "X-Model-Input-Shape": "4",
            "X-Model-Task": "multilabel",
        },
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["task"] == "multilabel"
    rng = np.random.default_rng(8)
    inputs = rng.normal(size=(400, 4)).astype(np.float32)
    with torch.no_grad():
        module = Linear(seed=3, n_features=4, n_out=5)
        logits = module(torch.as_tensor(inputs)).double().numpy() * 3.0
    labels = (rng.random((400, 5)) < expit(logits / 3.0)).astype(int)
    fitted = http.post("/v1/models/tagger/fit", json={"inputs": inputs.tolist(), "labels": labels.tolist()})
    assert fitted.status_code == 201, fitted.text
    answer = http.post(
        "/v1/models/tagger/predict", json={"inputs": inputs[:10].tolist(), "return_logits": True}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    model_logits = np.asarray(body["logits"])
    local = calibrator_from_dict(fitted.json())
    # the logits come back as float32 JSON numbers: the answer agrees to float32 precision
    np.testing.assert_allclose(body["probabilities"], local.transform(model_logits), rtol=1e-6)
    assert np.shape(body["probabilities"]) == (10, 5)


def test_the_cli_fits_and_evaluates_against_the_server(server, http, data, tmp_path):
    assert http.put("/v1/models/cli-tags", json={"num_classes": 5, "task": "multilabel"}).status_code == 201
    logits, labels, test_logits, test_labels = data
    np.savez(tmp_path / "fit.npz", logits=logits, labels=labels)
    np.savez(tmp_path / "test.npz", logits=test_logits, labels=test_labels)
    client = ["--server", server.url, "--model", "cli-tags"]
    fit = ["fit", "--logits", str(tmp_path / "fit.npz"), "--task", "multilabel", "--method", "platt"]
    assert cli.main([*fit, "--out", str(tmp_path / "doc.json"), *client]) == 0
    document = orjson.loads((tmp_path / "doc.json").read_bytes())
    assert document["task"] == "multilabel" and document["version"] == 1
    report = tmp_path / "report.json"
    evaluate = ["evaluate", "--logits", str(tmp_path / "test.npz"), "--task", "multilabel"]
    assert cli.main([*evaluate, "--out", str(report), "--fail-on", "ece_micro>0.5", *client]) == 0
    assert orjson.loads(report.read_bytes())["calibrated"]["per_label"][0]["n_positive"] == int(
        test_labels[:, 0].sum()
    )


def test_live_monitoring_is_refused_by_name_for_a_multilabel_model(http, model, data):
    logits, labels = data[2][:20], data[3][:20]
    outcomes = http.post(
        f"/v1/models/{model}/outcomes", json={"logits": logits.tolist(), "labels": labels.tolist()}
    )
    window = http.get(f"/v1/models/{model}/monitoring?window=1h")
    refit = http.post(f"/v1/models/{model}/refit", json={"window": "1h"})
    for answer in (outcomes, window, refit):
        assert answer.status_code == 400, answer.text
        assert (
            "live monitoring (outcomes, monitoring windows, refits) is not supported for multi-label"
            in answer.text
        )


def test_grpc_infer_answers_as_http_and_metadata_says_multilabel(server, http, model, data):
    import tritonclient.grpc as triton_grpc

    logits = data[2][:6]
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    tensor = triton_grpc.InferInput("logits", list(logits.shape), "FP64")
    tensor.set_data_from_numpy(logits)
    outputs = [
        triton_grpc.InferRequestedOutput("probabilities"),
        triton_grpc.InferRequestedOutput("predicted_class"),
    ]
    result = client.infer(model, [tensor], outputs=outputs)
    v1 = http.post(f"/v1/models/{model}/calibrate", json={"logits": logits.tolist()}).json()
    np.testing.assert_allclose(result.as_numpy("probabilities"), v1["probabilities"], rtol=1e-12)
    chosen = result.as_numpy("predicted_class")
    assert chosen.shape == (6, 5)
    assert [np.flatnonzero(row).tolist() for row in chosen] == v1["predicted_labels"]
    metadata = http.get(f"/v2/models/{model}").json()
    assert metadata["parameters"] == {"task": "multilabel"}
    shapes = {output["name"]: output["shape"] for output in metadata["outputs"]}
    assert shapes["probabilities"] == [-1, 5] and shapes["predicted_class"] == [-1, 5]


def test_evaluate_refuses_options_multilabel_figures_do_not_have(http, model, data):
    body = {"logits": data[2].tolist(), "labels": data[3].tolist(), "bootstrap": 100, "binning": "mass"}
    answer = http.post(f"/v1/models/{model}/evaluate", json=body)
    assert answer.status_code == 400, answer.text
    assert "binning, bootstrap are not supported for a multi-label model" in answer.json()["detail"]


def test_the_cli_exports_the_multilabel_calibration_of_the_server(server, http, model, data, tmp_path):
    out = tmp_path / "tags.pt"
    assert cli.main(["export", "--server", server.url, "--model", model, "--out", str(out)]) == 0
    extra = {"calibserve.json": ""}
    module = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    assert orjson.loads(extra["calibserve.json"])["task"] == "multilabel"
    logits = data[2][:50]
    with torch.no_grad():
        exported = module(torch.as_tensor(logits)).numpy()
    served = http.post(f"/v1/models/{model}/calibrate", json={"logits": logits.tolist()}).json()[
        "probabilities"
    ]
    np.testing.assert_allclose(exported, served, atol=1e-6, rtol=0)


def test_a_models_task_cannot_change_under_its_active_calibrator_and_names_label_figures(http, data):
    made = http.put(
        "/v1/models/named", json={"num_classes": 5, "task": "multilabel", "class_names": list("abcde")}
    )
    assert made.status_code == 201, made.text
    logits, labels = data[0][:300], data[1][:300]
    assert (
        http.post(
            "/v1/models/named/fit", json={"logits": logits.tolist(), "labels": labels.tolist()}
        ).status_code
        == 201
    )
    changed = http.put("/v1/models/named", json={"num_classes": 5, "task": "multiclass"})
    assert changed.status_code == 409 and "active calibrator of another task" in changed.text
    report = http.post(
        "/v1/models/named/evaluate", json={"logits": logits.tolist(), "labels": labels.tolist()}
    ).json()
    assert [row["name"] for row in report["calibrated"]["per_label"]] == list("abcde")
    answer = http.post("/v1/models/named/calibrate", json={"logits": [[9.0, -9.0, 9.0, -9.0, -9.0]]}).json()
    assert answer["predicted_labels"] == [[0, 2]] and answer["predicted_label"] == [["a", "c"]]


def test_a_shipped_torchscript_models_json_declares_the_task(tmp_path):
    from service.errors import ModelFailed
    from service.registry import ModelRegistry

    for name, task in (("tagger", "multilabel"), ("broken", "several")):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "model.pt").write_bytes(scripted(Linear(seed=1, n_features=4, n_out=5)))
        (directory / "model.json").write_text(orjson.dumps({"input_shape": [4], "task": task}).decode())
    registry = ModelRegistry(tmp_path, device="cpu")
    registry.load_all()
    assert registry.get("tagger").task == "multilabel"
    assert "task must be one of multiclass, multilabel" in registry.failing()["broken"]
    with pytest.raises(ModelFailed, match="task must be one of"):
        registry.get("broken")


def test_a_huge_logit_moves_only_its_own_label(http, model, data):
    row = data[2][:1].copy()
    huge = row.copy()
    huge[0, 0] = 1e200
    answers = http.post(f"/v1/models/{model}/calibrate", json={"logits": [row[0].tolist(), huge[0].tolist()]})
    assert answers.status_code == 200, answers.text
    plain, with_huge = np.asarray(answers.json()["probabilities"])
    np.testing.assert_array_equal(with_huge[1:], plain[1:])
    assert with_huge[0] >= plain[0]


def test_v1_metrics_scores_per_label_sigmoid_scores(http, data):
    logits, labels = data[2], data[3]
    answer = http.post(
        "/v1/metrics", json={"logits": logits.tolist(), "labels": labels.tolist(), "task": "multilabel"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    local = multilabel_workflows.evaluate(logits, labels)["uncalibrated"]
    assert body["ece"] == pytest.approx(local["ece"], rel=1e-12) and body["nll_micro"] == pytest.approx(
        local["nll_micro"]
    )
    assert len(body["reliability_per_label"]) == 5
    buffer = io.BytesIO()
    np.savez(buffer, probabilities=expit(logits), labels=labels)
    binary = http.post(
        "/v1/metrics?task=multilabel",
        content=buffer.getvalue(),
        headers={"content-type": "application/x-npz"},
    )
    assert binary.status_code == 200, binary.text
    assert binary.json()["brier"] == pytest.approx(local["brier"], rel=1e-12)
