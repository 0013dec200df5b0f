"""``calibserve fit --conformal``, ``apply --sets`` and ``evaluate`` on a calibrator with prediction sets, run
as a user runs them (processes), on the real CIFAR-10 outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from service import workflows
from service.core import conformal
from tests.helpers.cli import Run, run_all
from tests.helpers.data import CIFAR10

DATA = CIFAR10


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, Run]]:
    work = tmp_path_factory.mktemp("cli_conformal")
    with np.load(DATA) as data:
        np.save(work / "test_logits.npy", data["logits_test"])
        np.save(work / "test_labels.npy", data["labels_test"])
    val = [f"--logits={DATA}:logits_val", f"--labels={DATA}:labels_val"]
    first = run_all(
        {
            "fit": [
                "fit",
                *val,
                "--conformal",
                "raps",
                "--alpha",
                "0.1",
                "--k-reg",
                "2",
                "--raps-lambda",
                "0.02",
                "--conformal-fraction",
                "0.4",
                "--out",
                "sets.json",
            ],
            "alpha_alone": ["fit", *val, "--alpha", "0.1", "--out", "x.json"],
            "bad_alpha": ["fit", *val, "--conformal", "lac", "--alpha", "1.5", "--out", "y.json"],
        },
        work,
    )
    test = ["--logits", "test_logits.npy"]
    second = run_all(
        {
            "apply": ["apply", *test, "--calibrator", "sets.json", "--out", "p.npy", "--sets", "sets.npy"],
            "evaluate": [
                "evaluate",
                *test,
                "--labels",
                "test_labels.npy",
                "--calibrator",
                "sets.json",
                "--out",
                "report.json",
                "--out",
                "report.md",
            ],
            "evaluate_asked": [
                "evaluate",
                *test,
                "--labels",
                "test_labels.npy",
                "--conformal",
                "aps",
                "--randomized",
                "--mondrian",
                "--alpha",
                "0.2",
                "--out",
                "asked.json",
            ],
        },
        work,
    )
    return work, first | second


def test_fit_writes_the_sets_into_the_document_and_apply_writes_them(runs):
    work, done = runs
    assert done["fit"].returncode == 0, done["fit"].stderr
    assert "conformal raps sets at alpha 0.1" in done["fit"].stderr
    document = orjson.loads((work / "sets.json").read_bytes())
    block = document["conformal"]
    assert (block["score"], block["k_reg"], block["lambda"], block["fraction"]) == ("raps", 2, 0.02, 0.4)
    assert done["apply"].returncode == 0, done["apply"].stderr
    probabilities, sets = np.load(work / "p.npy"), np.load(work / "sets.npy")
    expected = conformal.prediction_sets(probabilities, workflows.load_conformal(document))
    np.testing.assert_array_equal(sets, expected.astype(np.uint8))


def test_evaluate_reports_coverage_in_json_and_markdown(runs):
    work, done = runs
    assert done["evaluate"].returncode == 0, done["evaluate"].stderr
    figures = orjson.loads((work / "report.json").read_bytes())["conformal"]
    assert figures["score"] == "raps" and figures["n"] == 5000
    # not randomised, "include the last label": conservative on an accurate model (90 % top-1)
    assert figures["coverage"] >= 0.88 and figures["mean_set_size"] >= 1
    markdown = (work / "report.md").read_text()
    assert (
        "Conformal prediction sets (raps) at alpha 0.1" in markdown
        and "| set size | rows | coverage |" in markdown
    )


def test_conformal_flags_fail_with_one_line_reasons(runs):
    _, done = runs
    assert done["alpha_alone"].returncode == 2
    assert "--alpha goes with --conformal lac|aps|raps" in done["alpha_alone"].stderr
    assert done["bad_alpha"].returncode == 2
    assert "conformal.alpha must be a number in (0, 1)" in done["bad_alpha"].stderr


def test_evaluate_fits_sets_on_half_the_rows_when_asked(runs):
    work, done = runs
    assert done["evaluate_asked"].returncode == 0, done["evaluate_asked"].stderr
    figures = orjson.loads((work / "asked.json").read_bytes())["conformal"]
    assert figures["source"] == "asked" and (figures["score"], figures["mondrian"]) == ("aps", True)
    assert len(figures["thresholds"]) == 10 and figures["n"] + figures["n_threshold"] == 5000
    assert figures["coverage"] == pytest.approx(0.8, abs=0.03)
