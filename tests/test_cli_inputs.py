"""``--inputs`` for TorchScript models: run locally from --models-dir, or by the service with --server; the
digits-mlp walkthrough works as its README writes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from tests.helpers.servers import Server

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "models" / "digits-mlp"


def test_the_digits_walkthrough_fits_and_evaluates_on_inputs_locally(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(
        REPO
    )  # the README's paths are relative to the checkout, and --models-dir defaults to models
    out = tmp_path / "digits.json"
    argv = ["fit", "--model", "digits-mlp", "--inputs", "models/digits-mlp/validation.npz:inputs"]
    assert main([*argv, "--labels", "models/digits-mlp/validation.npz:labels", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    with np.load(DIGITS / "validation.npz") as data:
        stored_logits = data["logits"]
        labels = data["labels"]
    from service.workflows import fit_document

    expected = fit_document(stored_logits, labels)
    # the model's float32 forward pass differs across CPUs by a few ulps; T follows to about 1e-6
    assert document["temperature"] == pytest.approx(expected["temperature"], rel=1e-5)
    capsys.readouterr()
    report_file = tmp_path / "report.json"
    evaluate = ["evaluate", "--model", "digits-mlp", "--inputs", "models/digits-mlp/test.npz:inputs"]
    evaluate += ["--labels", "models/digits-mlp/test.npz:labels", "--calibrator", str(out)]
    assert main([*evaluate, "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["n"] == 360 and report["calibrated"]["nll"] < report["uncalibrated"]["nll"]


def test_inputs_need_a_model_and_a_model_that_exists(tmp_path, capsys):
    spec = str(DIGITS / "test.npz") + ":inputs"
    assert main(["evaluate", "--inputs", spec, "--labels", str(DIGITS / "test.npz") + ":labels"]) == 2
    assert "--inputs needs --model NAME" in capsys.readouterr().err
    argv = ["fit", "--model", "nope", "--models-dir", str(REPO / "models"), "--inputs", spec]
    assert main([*argv, "--labels", str(DIGITS / "test.npz") + ":labels", "--out", str(tmp_path / "x")]) == 2
    assert "has no TorchScript model 'nope'" in capsys.readouterr().err


def test_inputs_run_on_the_service_with_server(tmp_path, capsys):
    with Server(tmp_path / "store") as server:
        argv = ["fit", "--server", server.url, "--model", "digits-mlp"]
        argv += ["--inputs", str(DIGITS / "validation.npz") + ":inputs"]
        argv += ["--labels", str(DIGITS / "validation.npz") + ":labels", "--out", str(tmp_path / "v.json")]
        assert main(argv) == 0
        document = json.loads((tmp_path / "v.json").read_text())
        assert document["model"] == "digits-mlp" and document["version"] == 1
        assert document["fit"]["n"] == 360
