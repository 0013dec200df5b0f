"""Segments (issue #15): every figure per segment, the worst gated segment, and ``worst.*`` gates.

The data: a 4-class model, temperature-scaled on all rows, evaluated on a set where one segment's logits
are three times too large: calibrated on average, badly over-confident for that segment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from service import workflows
from service.core import metrics
from service.errors import InvalidInput
from tests.helpers.cli import run_all


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    n = 3000
    logits = rng.normal(0.0, 3.0, size=(n, 4))
    labels = (logits / 2 + rng.gumbel(size=logits.shape)).argmax(axis=1)
    segments = np.array(["north", "south", "east"])[rng.integers(0, 3, n)].tolist()
    segments[:40] = ["tiny"] * 40
    over = np.array([s == "south" for s in segments])
    shifted = logits.copy()
    shifted[over] *= 3.0  # the south segment is over-confident
    document = workflows.fit_document(logits, labels)
    return {"logits": shifted, "labels": labels, "segments": segments, "document": document, "over": over}


def test_every_figure_per_segment_and_the_worst(data):
    report = workflows.evaluate(
        data["logits"], data["labels"], calibrator_document=data["document"], segments=data["segments"]
    )
    segments = report["segments"]
    assert segments["n_segments"] == 4 and segments["gated"] == 3
    tiny = segments["by_segment"]["tiny"]
    assert tiny["n"] == 40 and not tiny["gated"]  # reported, not gated
    south = segments["by_segment"]["south"]
    rows = np.array(data["segments"]) == "south"
    calibrated, from_logits = workflows.calibrated_scores(
        workflows.load_calibrator(data["document"]), data["logits"][rows]
    )
    expected = metrics.calibration_report(calibrated, data["labels"][rows], from_logits=from_logits)
    for name in ("ece", "mce", "brier", "nll", "accuracy", "ece_smooth", "spiegelhalter_p"):
        assert south["calibrated"][name] == pytest.approx(expected[name], rel=1e-12, abs=1e-300), name
    worst = segments["worst"]["calibrated"]
    assert worst["ece"]["segment"] == "south"
    assert worst["spiegelhalter_p"]["segment"] == "south"  # the smallest p-value is the worst
    # the worst is over gated segments only, and the whole set looks calibrated by comparison
    assert worst["ece"]["value"] == max(
        entry["calibrated"]["ece"] for entry in segments["by_segment"].values() if entry["gated"]
    )
    assert report["calibrated"]["ece"] < worst["ece"]["value"] / 2
    assert orjson.loads(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))["segments"]["gated"] == 3


def test_worst_gates_and_interval_bounds(data):
    report = workflows.evaluate(
        data["logits"],
        data["labels"],
        calibrator_document=data["document"],
        segments=data["segments"],
        bootstrap=40,
        min_segment_size=500,
    )
    assert "intervals" in report["segments"]["by_segment"]["south"]
    assert "intervals" not in report["segments"]["by_segment"]["tiny"]
    checks = workflows.check_thresholds(
        report,
        ["worst.ece>0.15", "calibrated.worst.ece.lower>0.15", "uncalibrated.worst.accuracy<0.3", "ece>0.15"],
    )
    status = {check["name"]: check["status"] for check in checks}
    assert status == {
        "worst.ece>0.15": "fail",
        "calibrated.worst.ece.lower>0.15": "fail",
        "uncalibrated.worst.accuracy<0.3": "pass",
        "ece>0.15": "pass",  # the average hides the segment
    }
    assert checks[0]["segment"] == "south" and checks[0]["segment_n"] >= 500


def test_signed_figures_are_worst_furthest_from_their_ideal_and_gates_take_the_side_they_test(data):
    # south is over-confident (slope well below 1); make east under-confident (logits shrunk: slope above 1)
    logits = data["logits"].copy()
    east = np.array([s == "east" for s in data["segments"]])
    logits[east] /= 4.0
    report = workflows.evaluate(
        logits, data["labels"], calibrator_document=data["document"], segments=data["segments"]
    )
    by_segment = report["segments"]["by_segment"]
    slopes = {
        name: entry["calibrated"]["calibration_slope"] for name, entry in by_segment.items() if entry["gated"]
    }
    assert slopes["south"] < 1 < slopes["east"]
    worst = report["segments"]["worst"]["calibrated"]["calibration_slope"]
    assert worst["segment"] == max(slopes, key=lambda name: abs(slopes[name] - 1.0))
    # a gate reads the segment nearest to breaching it, on the side it tests
    low, high = workflows.check_thresholds(
        report, ["worst.calibration_slope<0.9", "worst.calibration_slope>1.1"]
    )
    assert (low["segment"], low["value"]) == ("south", slopes["south"]) and low["status"] == "fail"
    assert (high["segment"], high["value"]) == ("east", slopes["east"]) and high["status"] == "fail"


def test_a_floor_above_every_segment_leaves_worst_gates_unknown(data):
    report = workflows.evaluate(
        data["logits"], data["labels"], segments=data["segments"], min_segment_size=5000
    )
    (check,) = workflows.check_thresholds(report, ["worst.ece>0.15"])
    assert check["status"] == "unknown" and "5000" in check["detail"]


def test_segment_input_is_checked(data):
    logits, labels = data["logits"][:10], data["labels"][:10]
    for segments, message in (
        (["a"] * 9, "one segment per row"),
        ([True] * 10, "string or an integer"),
        ([1.5] * 10, "string or an integer"),
        ([None] * 10, "string or an integer"),
    ):
        with pytest.raises(InvalidInput, match=message):
            workflows.evaluate(logits, labels, segments=segments)
    with pytest.raises(InvalidInput, match="has no segments"):
        workflows.check_thresholds(workflows.evaluate(logits, labels), ["worst.ece>0.1"])
    # integer keys are keys too, reported as strings
    report = workflows.evaluate(logits, labels, segments=[7] * 5 + [8] * 5, min_segment_size=1)
    assert set(report["segments"]["by_segment"]) == {"7", "8"}


def test_cli_segments_and_a_worst_gate(data, tmp_path: Path):
    np.save(tmp_path / "logits.npy", data["logits"])
    np.save(tmp_path / "labels.npy", data["labels"])
    (tmp_path / "calibrator.json").write_bytes(orjson.dumps(data["document"]))
    (tmp_path / "segments.jsonl").write_text("".join(f'"{s}"\n' for s in data["segments"]))
    common = [
        "evaluate",
        "--logits",
        "logits.npy",
        "--labels",
        "labels.npy",
        "--calibrator",
        "calibrator.json",
    ]
    runs = run_all(
        {
            "gate": [
                *common,
                *("--segments", "segments.jsonl", "--fail-on", "worst.ece>0.15", "--fail-on", "ece>0.15"),
                *("--out", "segments.json", "--out", "segments.md", "--out", "segments.xml"),
            ],
            "no_segments": [*common, "--fail-on", "worst.ece>0.15"],
        },
        tmp_path,
    )
    assert runs["gate"].returncode == 1, runs["gate"].stderr
    report = orjson.loads((tmp_path / "segments.json").read_bytes())
    assert [check["status"] for check in report["thresholds"]] == ["fail", "pass"]
    assert "worst.ece = " in (tmp_path / "segments.md").read_text()
    assert "segment 'south'" in (tmp_path / "segments.xml").read_text()
    assert runs["no_segments"].returncode == 2 and "--segments" in runs["no_segments"].stderr


def test_reports_show_segments_worst_first(data):
    from service import plots, reports
    from tests.helpers.images import png_size

    report = workflows.evaluate(
        data["logits"], data["labels"], calibrator_document=data["document"], segments=data["segments"]
    )
    assert plots.segment_order(report) == ["south", *plots.segment_order(report)[1:3], "tiny"]
    markdown = reports.to_markdown(report)
    table = [
        line for line in markdown.splitlines() if line.startswith("| south") or line.startswith("| tiny")
    ]
    assert table[0].startswith("| south") and "| no |" in table[1]
    image = plots.segment_diagrams(report)
    assert png_size(image) == (4 * 240, 240)  # four panels of 2.4 in at 100 dpi, one row
    html = reports.to_html(report)
    assert "<h2>Segments</h2>" in html and "reliability diagram per segment" in html
    south = report["segments"]["by_segment"]["south"]["reliability"]["calibrated"]
    assert sum(south["counts"]) == report["segments"]["by_segment"]["south"]["n"]
