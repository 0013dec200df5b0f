"""Input readers (service.io), report renderers (service.reports) and reliability diagrams (service.plots)."""

from __future__ import annotations

import base64
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import io, plots, reports, workflows
from service.core import metrics
from service.errors import InvalidInput
from tests.helpers.images import png_size


@pytest.fixture(scope="module")
def labelled():
    """An over-confident 4-class model: logits = 3 x a calibrated model's logits."""
    rng = np.random.default_rng(7)
    n, k = 600, 4
    true_logits = rng.normal(0.0, 1.5, size=(n, k))
    p = np.exp(true_logits - true_logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return (3.0 * true_logits).astype(np.float32), labels


@pytest.fixture(scope="module")
def report(labelled):
    logits, labels = labelled
    document = workflows.fit_document(logits, labels)
    report = workflows.evaluate(logits, labels, calibrator_document=document, bootstrap=20, seed=1)
    checks = workflows.check_thresholds(report, ["ece>0.5", "uncalibrated.ece>0.05", "accuracy<0.2"])
    return workflows.apply_checks(report, checks)


# ------------------------------------------------------------------------------------------------- readers


def test_npz_key_syntax_and_default_keys(tmp_path):
    logits = np.arange(6, dtype=np.float32).reshape(3, 2)
    labels = np.array([0, 1, 1])
    path = tmp_path / "run.npz"
    np.savez(path, logits=logits, labels=labels, logits_val=logits * 2)
    np.testing.assert_array_equal(io.read_scores(f"{path}:logits_val"), logits * 2)
    np.testing.assert_array_equal(io.read_scores(path), logits)
    np.testing.assert_array_equal(io.read_labels(io.labels_spec_from_scores(path)), labels)
    with pytest.raises(
        InvalidInput, match=r"has no array 'probabilities' \(it has: logits, labels, logits_val\)"
    ):
        io.read_scores(path, kind="probabilities")
    single = tmp_path / "single.npz"
    np.savez(single, scores=logits)
    np.testing.assert_array_equal(io.read_scores(single), logits)


def test_split_spec_only_takes_a_key_after_npz():
    assert io.split_spec("a/b.npz:logits_test") == (io.Path("a/b.npz"), "logits_test")
    assert io.split_spec("c:/data/x.npy") == (io.Path("c:/data/x.npy"), None)
    assert io.split_spec("weird:name.csv") == (io.Path("weird:name.csv"), None)


def test_npy_refuses_pickled_objects(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match=r"not a readable \.npy array"):
        io.read_scores(path)


def test_csv_with_and_without_header(tmp_path):
    with_header = tmp_path / "scores.csv"
    with_header.write_text("cat,dog,bird\n0.5,-1,2e-3\n1,2,3\n")
    np.testing.assert_array_equal(io.read_scores(with_header), [[0.5, -1.0, 0.002], [1, 2, 3]])
    bare = tmp_path / "labels.csv"
    bare.write_text("2\n0\n\n1\n")
    np.testing.assert_array_equal(io.read_labels(bare), [2, 0, 1])
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,oops\n")
    with pytest.raises(InvalidInput, match="line 2: 'oops' is not a number"):
        io.read_scores(bad)
    wide = tmp_path / "wide.csv"
    wide.write_text("1,2\n3,4\n")
    with pytest.raises(InvalidInput, match="a labels CSV has one column, this one has 2"):
        io.read_labels(wide)


def test_jsonl_arrays_ints_and_records(tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text("[0.1, 0.9]\n\n[0.7, 0.3]\n")
    np.testing.assert_array_equal(io.read_scores(scores, kind="probabilities"), [[0.1, 0.9], [0.7, 0.3]])
    labels = tmp_path / "labels.jsonl"
    labels.write_text("1\n0\n")
    assert io.read_labels(labels).tolist() == [1, 0]
    assert io.read_labels(labels).dtype.kind == "i"
    labels.write_text('1\n"cat"\n')
    with pytest.raises(InvalidInput, match="each line must hold one integer label"):
        io.read_labels(labels)
    records = tmp_path / "records.jsonl"
    records.write_text('{"logits": [2.0, -1.0], "label": 0}\n{"logits": [0.5, 1.5], "label": 1}\n')
    np.testing.assert_array_equal(io.read_scores(records), [[2.0, -1.0], [0.5, 1.5]])
    assert io.read_labels(io.labels_spec_from_scores(records)).tolist() == [0, 1]
    with pytest.raises(InvalidInput, match="record 0 has no 'probabilities' field"):
        io.read_scores(records, kind="probabilities")
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text("[1, 2]\n[1, 2, 3]\n")
    with pytest.raises(InvalidInput, match="one length"):
        io.read_scores(ragged)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("[1, 2]\n[1, 2\n")
    with pytest.raises(InvalidInput, match="line 2: not valid JSON"):
        io.read_scores(broken)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(InvalidInput, match=r"unsupported file type '.parquet'"):
        io.read_scores(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError):
        io.read_scores(tmp_path / "absent.npy")


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".jsonl"])
def test_written_probabilities_read_back_exactly(tmp_path, suffix):
    probabilities = np.random.default_rng(0).dirichlet(np.ones(5), size=7)
    path = tmp_path / f"probs{suffix}"
    io.write_array(path, probabilities)
    assert path.exists() and not (tmp_path / f"probs{suffix}.npy").exists()
    np.testing.assert_array_equal(io.read_scores(path, kind="probabilities"), probabilities)


def test_progress_is_reported_to_the_end(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text("1\n" * 10)
    calls = []
    io.read_labels(path, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (20, 20)


# ---------------------------------------------------------------------------------------------------- JSON


def test_json_report_round_trips_and_is_its_own_baseline(report):
    text = reports.to_json(report)
    loaded = orjson.loads(text)
    assert loaded == orjson.loads(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))
    assert loaded["kind"] == workflows.REPORT_KIND
    assert set(loaded["uncalibrated"]) >= {"ece", "mce", "brier", "nll", "accuracy"}
    assert loaded["calibrator"]["method"] == "temperature" and loaded["calibrator"]["temperature"] > 1
    checks = workflows.check_drift(loaded, loaded, workflows.parse_max_increase("ece=0,nll=0,accuracy=0"))
    assert [check["status"] for check in checks] == ["pass"] * 3
    assert all(check["change"] == 0 for check in checks)


def test_format_for_path():
    assert [reports.format_for_path(p) for p in ("a.json", "b.XML", "c.md", "d.html")] == [
        "json",
        "junit",
        "markdown",
        "html",
    ]
    with pytest.raises(InvalidInput, match="cannot tell the report format"):
        reports.format_for_path("summary")


# --------------------------------------------------------------------------------------------------- JUnit


def junit_cases(xml: bytes) -> tuple[ET.Element, ET.Element, list[ET.Element]]:
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    for element in (root, suite):
        assert int(element.get("tests")) == len(cases)
        assert int(element.get("failures")) == sum(case.find("failure") is not None for case in cases)
        assert element.get("errors") == "0"
    for case in cases:
        assert case.get("name") and case.get("classname") == reports.JUNIT_CLASSNAME
        failure = case.find("failure")
        if failure is not None:
            assert failure.get("message") and failure.get("type") == "threshold"
    return root, suite, cases


def test_junit_has_one_testcase_per_threshold_with_the_numbers(report):
    _, suite, cases = junit_cases(reports.to_junit(report))
    assert [case.get("name") for case in cases] == ["ece>0.5", "uncalibrated.ece>0.05", "accuracy<0.2"]
    failed = [case for case in cases if case.find("failure") is not None]
    assert [case.get("name") for case in failed] == ["uncalibrated.ece>0.05"]
    value = report["uncalibrated"]["ece"]
    assert failed[0].find("failure").get("message") == f"ece = {value:.6g} > 0.05"
    assert f"value: {value}" in failed[0].find("failure").text
    assert suite.find("properties/property[@name='n']").get("value") == "600"


def test_junit_without_thresholds_has_one_passing_evaluation_case(labelled):
    logits, labels = labelled
    _, _, cases = junit_cases(reports.to_junit(workflows.evaluate(logits, labels)))
    assert [case.get("name") for case in cases] == ["evaluation"]
    assert cases[0].find("failure") is None
    assert "ece\t" in cases[0].find("system-out").text


check_strategy = st.fixed_dictionaries(
    {
        # (not the status marks themselves: the test counts them in the Markdown)
        "name": st.text(
            st.characters(
                blacklist_categories=("Cs", "Cc"),
                blacklist_characters=reports.FAIL_MARK + reports.PASS_MARK,
            ),
            min_size=1,
            max_size=20,
        ),
        "metric": st.sampled_from(["ece", "nll", "accuracy"]),
        "op": st.sampled_from([">", "<", ">=", "<="]),
        "limit": st.floats(-1e3, 1e3),
        "value": st.floats(-1e3, 1e3),
        "status": st.sampled_from(["pass", "fail"]),
    }
)


@settings(max_examples=50, deadline=None)
@given(st.lists(check_strategy, max_size=8))
def test_junit_counts_and_escaping_hold_for_any_checks(checks):
    report = {"kind": workflows.REPORT_KIND, "n": 3, "uncalibrated": {"ece": 0.1}, "thresholds": checks}
    _, _, cases = junit_cases(reports.to_junit(report))
    if checks:
        assert [case.get("name") for case in cases] == [check["name"] for check in checks]
    markdown = reports.to_markdown(report)
    assert markdown.count(reports.FAIL_MARK) == sum(c["status"] == "fail" for c in checks) + (
        1 if any(c["status"] == "fail" for c in checks) else 0
    )


# ------------------------------------------------------------------------------------------------ Markdown


def test_markdown_has_the_figures_and_thresholds_tables(report):
    markdown = reports.to_markdown(report)
    lines = markdown.splitlines()
    assert lines[0] == f"### calibserve calibration report {reports.FAIL_MARK} fail"
    header = lines.index("| figure | uncalibrated | calibrated | change |")
    assert lines[header + 1] == "|---|---:|---:|---:|"
    ece_row = next(line for line in lines if line.startswith("| ece |"))
    before, after = report["uncalibrated"]["ece"], report["calibrated"]["ece"]
    lo, hi = report["intervals"]["uncalibrated"]["ece"]
    assert ece_row.split(" | ")[1] == f"{before:.4g} [{lo:.4g}, {hi:.4g}]"
    assert ece_row.split(" | ")[3].rstrip(" |") == f"{after - before:.4g}"
    assert f"| {reports.FAIL_MARK} | `uncalibrated.ece>0.05` |" in markdown
    assert f"| {reports.PASS_MARK} | `ece>0.5` |" in markdown
    assert "3 checks, 2 passed, 1 failed." in markdown


# ---------------------------------------------------------------------------------------------------- HTML


def test_html_is_self_contained_and_escapes_text(report):
    hostile = dict(report)
    hostile["calibrator"] = {**report["calibrator"], "model": "<script>alert(1)</script>"}
    page = reports.to_html(hostile)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    (encoded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert png_size(base64.b64decode(encoded)) == plots.PIXEL_SIZE
    assert "<td>ece</td>" in page and 'class="fail"' in page
    assert re.search(r"<(link|script)\b", page) is None  # nothing fetched from elsewhere


# --------------------------------------------------------------------------------------------------- plots


def test_png_diagram_has_the_documented_size(report, tmp_path):
    path = tmp_path / "reliability.png"
    image = plots.reliability_diagram(report, path=path)
    assert path.read_bytes() == image
    assert png_size(image) == (600, 700) == plots.PIXEL_SIZE
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (700, 600)
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_svg_diagram_parses_and_shows_both_eces(report, tmp_path):
    image = plots.reliability_diagram(report, path=tmp_path / "reliability.svg")
    root = ET.fromstring(image)
    assert root.tag.endswith("svg")
    assert (root.get("width"), root.get("height")) == ("432pt", "504pt")
    texts = ["".join(element.itertext()) for element in root.iter() if element.tag.endswith("text")]
    for group, label in (("uncalibrated", "before"), ("calibrated", "after")):
        assert f"{label} calibration (ECE = {report[group]['ece']:.4f})" in texts
    assert plots.reliability_diagram(report, format="svg") == image  # deterministic (no date)


def test_diagram_of_an_uncalibrated_mass_binned_report(labelled):
    logits, labels = labelled
    report = workflows.evaluate(logits, labels, n_bins=10, binning="mass")
    assert png_size(plots.reliability_diagram(report)) == plots.PIXEL_SIZE
    with pytest.raises(InvalidInput, match="not 'pdf'"):
        plots.reliability_diagram(report, format="pdf")
    with pytest.raises(InvalidInput, match="no reliability bins"):
        plots.reliability_diagram({"uncalibrated": {}})


def test_check_messages_say_what_was_compared():
    fail_on = {"kind": "fail_on", "metric": "ece", "op": ">", "limit": 0.03, "value": 0.041}
    assert reports.check_message({**fail_on, "status": "fail"}) == "ece = 0.041 > 0.03"
    assert (
        reports.check_message({**fail_on, "value": 0.01, "status": "pass"}) == "ece = 0.01 (fails if > 0.03)"
    )
    report = {"uncalibrated": {"ece": 0.05, "accuracy": 0.80}}
    baseline = {"uncalibrated": {"ece": 0.02, "accuracy": 0.90}}
    ece, accuracy = workflows.check_drift(report, baseline, {"ece": 0.01, "accuracy": 0.05})
    assert reports.check_message(ece) == "ece rose by 0.03 (0.05 against baseline 0.02); allowed rise 0.01"
    assert accuracy["status"] == "fail"
    assert (
        reports.check_message(accuracy)
        == "accuracy fell by 0.1 (0.8 against baseline 0.9); allowed fall 0.05"
    )


# ------------------------------------------------------------------------------------------ drift rule


@pytest.mark.parametrize("fit", ["figures", "absent", "without_figures"])
def test_evaluate_adds_drift_exactly_when_the_document_has_fit_figures(labelled, tmp_path, fit):
    """One rule for every entry point: workflows.evaluate decides, and the CLI answers the same."""
    from service import cli

    logits, labels = labelled
    document = workflows.fit_document(logits, labels, model="m")
    if fit == "absent":  # e.g. a document written by hand and uploaded
        del document["fit"]
    elif fit == "without_figures":
        document["fit"] = {"n": document["fit"]["n"]}
    expected = fit == "figures"

    report = workflows.evaluate(logits, labels, calibrator_document=document)
    assert ("drift" in report) is expected
    if expected:
        assert report["drift"] == workflows.drift_against_fit(report, document)
        assert set(report["drift"]["change"]) == {"uncalibrated", "calibrated"}

    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "calibrator.json").write_bytes(orjson.dumps(document))
    out = tmp_path / "report.json"
    argv = ["evaluate", "--logits", str(tmp_path / "logits.npy"), "--labels", str(tmp_path / "labels.npy")]
    assert cli.main([*argv, "--calibrator", str(tmp_path / "calibrator.json"), "--out", str(out)]) == 0
    from_cli = orjson.loads(out.read_bytes())
    assert ("drift" in from_cli) is expected
    if expected:
        for group, changes in report["drift"]["change"].items():
            assert from_cli["drift"]["change"][group] == pytest.approx(changes, abs=1e-12)


# --------------------------------------------------------------------------------- fit-time figures


def _figures_the_long_way(document: dict, logits: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """The full reports the fit-time figures are a part of: figures of the logits, and of the log of the
    calibrated answer (exact NLL, as evaluations score it), each validated again."""
    calibrator = workflows.load_calibrator(document)
    before = workflows.figures(logits, labels)
    calibrated, from_logits = workflows.calibrated_scores(calibrator, logits)
    after = workflows.figures(calibrated, labels, from_logits=from_logits)
    return before, after


FIT_KEYS = {*metrics.FIT_FIGURES, "n", "conventions"}


def _assert_same_figures(stored: dict, expected: dict) -> None:
    """The fit-time figures are the report's headline figures, its two halves of ECE, ``n`` and the
    conventions of those (the ECE variants are left out), each equal to the full report's to 1e-12."""
    assert stored.keys() - {"nll_infinite_rows"} == FIT_KEYS
    assert stored.get("nll_infinite_rows") == expected.get("nll_infinite_rows")
    assert set(workflows.HEADLINE_FIGURES) <= stored.keys()
    for name in stored.keys() - {"conventions"}:
        value = expected[name]
        if isinstance(value, float) and math.isinf(value):
            assert stored[name] == value, name
        elif isinstance(value, float):
            assert stored[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        else:
            assert stored[name] == value, name
    conventions = dict(stored["conventions"])
    assert "ece_classwise" in conventions.pop("figures")  # says where the variants are
    assert conventions == {key: expected["conventions"][key] for key in conventions}


@pytest.mark.parametrize(
    ("method", "n_columns"),
    [
        ("temperature", 4),
        ("temperature", 1),
        ("vector", 4),
        ("matrix", 3),
        ("platt", 2),
        ("isotonic", 4),
        ("histogram", 4),
    ],
)
def test_fit_time_figures_equal_the_figures_of_the_calibrated_logits(method, n_columns):
    rng = np.random.default_rng(11)
    n = 3000
    logits = (rng.normal(0.0, 3.0, size=(n, n_columns))).astype(np.float32)
    labels = rng.integers(0, max(n_columns, 2), size=n)
    # rows so extreme that a calibrated true-class probability underflows to 0 (an infinite exact NLL,
    # except for temperature scaling, whose NLL comes from z / T)
    logits[:3] = 0.0
    logits[:3, 0] = 3e4
    labels[:3] = 1
    document = workflows.fit_document(logits, labels, method=method)
    before, after = _figures_the_long_way(document, logits, labels)
    _assert_same_figures(document["fit"]["before"], before)
    _assert_same_figures(document["fit"]["after"], after)
    assert document["fit"]["data_sha256"] == workflows.data_sha256(logits, labels)


def test_fit_time_figures_from_probabilities_equal_the_long_way(labelled):
    logits, labels = labelled
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    document = workflows.fit_document(probabilities, labels, from_logits=False)
    mapped = workflows.scores_to_logits(probabilities, from_logits=False)
    before, after = _figures_the_long_way(document, mapped, labels)
    _assert_same_figures(document["fit"]["before"], before)
    _assert_same_figures(document["fit"]["after"], after)


@pytest.mark.parametrize("method", ["temperature", "vector", "matrix", "isotonic", "histogram"])
@pytest.mark.parametrize(
    "name", ["netcal_wrn16-4_c10.npz", "kumar_vgg16_c10.npz", "netcal_densenet-bc-100_c100.npz"]
)
def test_fit_time_figures_equal_the_full_reports_on_real_logits(reference_data, name, method):
    """Real classifier outputs (tests/data), ten and a hundred classes (the narrow and the wide pass)."""
    data = reference_data(name)
    logits, labels = data["logits_val"], data["labels_val"]
    document = workflows.fit_document(logits, labels, method=method)
    before, after = _figures_the_long_way(document, logits, labels)
    _assert_same_figures(document["fit"]["before"], before)
    _assert_same_figures(document["fit"]["after"], after)


def test_fit_time_figures_equal_the_full_reports_on_a_million_rows():
    """1M x 10 float32 logits (the size of issue #10): the temperature pass, and the pass over
    probabilities that other methods take, against the full reports."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((1_000_000, 10))
    labels = (base + rng.gumbel(size=base.shape)).argmax(axis=1)
    logits = (3.0 * base).astype(np.float32)
    document = workflows.fit_document(logits, labels)
    before, after = _figures_the_long_way(document, logits, labels)
    _assert_same_figures(document["fit"]["before"], before)
    _assert_same_figures(document["fit"]["after"], after)
    probabilities = workflows.calibrate(workflows.load_calibrator(document), logits)
    from_probabilities = metrics.fit_figures_of_probabilities(probabilities, labels)
    _assert_same_figures(from_probabilities, after)
