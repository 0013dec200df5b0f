"""The CLI's local mode on a multi-label model (``--task multilabel``): fit, apply, evaluate with per-label
small multiples, and drift. Data: the synthetic multi-label set of tests/helpers/multilabel.py."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.cli import main
from service.core.calibrators import PerLabelCalibration
from tests.helpers.images import png_size
from tests.helpers.multilabel import multilabel_set


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli-multilabel")
    logits, labels = multilabel_set(1000, seed=0)
    test_logits, test_labels = multilabel_set(500, seed=1)
    np.savez(directory / "fit.npz", logits=logits, labels=labels)
    np.savez(directory / "test.npz", logits=test_logits, labels=test_labels)
    # the same model made three times more over-confident
    np.savez(directory / "drifted.npz", logits=test_logits * 3.0, labels=test_labels)
    return directory


def test_fit_apply_evaluate_and_drift(files):
    doc = files / "isotonic.json"
    fit = ["fit", "--logits", str(files / "fit.npz"), "--task", "multilabel", "--method", "isotonic"]
    assert main([*fit, "--out", str(doc)]) == 0
    document = orjson.loads(doc.read_bytes())
    assert document["task"] == "multilabel" and len(document["params"]["labels"]) == 5

    out = files / "p.npy"
    assert (
        main(["apply", "--logits", str(files / "test.npz"), "--calibrator", str(doc), "--out", str(out)]) == 0
    )
    with np.load(files / "fit.npz") as fitted, np.load(files / "test.npz") as test:
        local = PerLabelCalibration("isotonic").fit(fitted["logits"], fitted["labels"])
        np.testing.assert_allclose(np.load(out), local.transform(test["logits"]), rtol=1e-12)

    report, plot = files / "report.json", files / "labels.png"
    evaluate = ["evaluate", "--logits", str(files / "test.npz"), "--calibrator", str(doc)]
    assert main([*evaluate, "--out", str(report), "--out", str(files / "r.md"), "--plot", str(plot)]) == 0
    body = orjson.loads(report.read_bytes())
    assert body["task"] == "multilabel" and len(body["calibrated"]["per_label"]) == 5
    assert body["calibrated"]["ece"] < body["uncalibrated"]["ece"]
    width, height = png_size(plot.read_bytes())
    assert (width, height) == (960, 520)  # 4 x 2 panels of 2.4 in at 100 dpi, and the title
    assert "ece_micro" in (files / "r.md").read_text()

    drift = [
        "drift",
        "--logits",
        str(files / "drifted.npz"),
        "--calibrator",
        str(doc),
        "--baseline",
        str(report),
    ]
    assert main([*drift, "--max-increase", "ece=0.02", "--out", str(files / "drift.json")]) == 1
    assert main([*drift[:2], str(files / "test.npz"), *drift[3:], "--out", str(files / "same.json")]) == 0


def test_multilabel_needs_the_task_and_bad_input_exits_2(files, capsys):
    assert main(["fit", "--logits", str(files / "fit.npz"), "--out", str(files / "x.json")]) == 2
    assert "labels must be 1-D" in capsys.readouterr().err
    bad = ["fit", "--logits", str(files / "fit.npz"), "--task", "multilabel", "--method", "matrix"]
    assert main([*bad, "--out", str(files / "x.json")]) == 2
    assert "not available for a multi-label model" in capsys.readouterr().err
