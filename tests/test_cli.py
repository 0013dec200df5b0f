"""The ``calibserve`` command line, run as a subprocess on real classifier outputs and on synthetic drift.

Each Python start imports numpy, scipy, scikit-learn and torch, so commands are started in a few batches of
independent processes (one batch per dependency level) and every test reads the batch's results.
"""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from service import cli
from tests.helpers.cli import Run, run_all
from tests.helpers.data import CIFAR10
from tests.helpers.images import png_size
from tests.helpers.numerics import EPS32

DATA = CIFAR10
# tests/data/README.md: WideResNet-16-4 on CIFAR-10, test half, independently computed
REFERENCE = {
    "temperature": 2.03915,
    "uncalibrated": {"ece": 0.055219, "mce": 0.321881, "nll": 0.383129, "brier": 0.145812},
    "calibrated": {"ece": 0.006447, "mce": 0.098878, "nll": 0.276111, "brier": 0.132428},
    "error": 0.0894,
}


def assert_ok(run: Run, code: int = 0) -> None:
    assert run.returncode == code, f"{run.args}: exit {run.returncode}, stderr:\n{run.stderr}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Inputs: the real test split as .npy files, its synthetic drift (logits x 3) and broken variants."""
    directory = tmp_path_factory.mktemp("cli")
    with np.load(DATA) as data:
        logits, labels = data["logits_test"], data["labels_test"]
    np.save(directory / "test_logits.npy", logits)
    np.save(directory / "test_labels.npy", labels)
    # the same model made over-confident between two runs: same labels, logits times 3
    np.save(directory / "overconfident_logits.npy", logits * np.float32(3.0))
    np.save(directory / "cube.npy", logits[:, :, None])
    with_nan = logits.copy()
    with_nan[3, 2] = np.nan
    np.save(directory / "nan_logits.npy", with_nan)
    np.save(directory / "short_labels.npy", labels[:-1])
    # the validation half as text files: a CSV with a header row, labels one JSON integer a line
    with np.load(DATA) as data:
        val_logits, val_labels = data["logits_val"], data["labels_val"]
    header = ",".join(f"class_{k}" for k in range(val_logits.shape[1]))
    np.savetxt(
        directory / "val_logits.csv", val_logits, fmt="%.9g", delimiter=",", header=header, comments=""
    )
    (directory / "val_labels.jsonl").write_text("".join(f"{int(label)}\n" for label in val_labels))
    return directory


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, Run]:
    val = [f"--logits={DATA}:logits_val", f"--labels={DATA}:labels_val"]
    test = ["--logits", "test_logits.npy", "--labels", "test_labels.npy"]
    first = run_all(
        {
            "fit": ["fit", *val, "--model", "wrn", "--out", "calibrator.json"],
            "fit_venn_abers": ["fit", *val, "--method", "venn_abers", "--out", "va.json"],
            "fit_text": [
                "fit",
                "--logits",
                "val_logits.csv",
                "--labels",
                "val_labels.jsonl",
                "--out",
                "text.json",
            ],
            "missing_file": ["evaluate", "--logits", "absent.npy", "--labels", "test_labels.npy"],
            "bad_shape": ["evaluate", "--logits", "cube.npy", "--labels", "test_labels.npy"],
            "nan": ["evaluate", "--logits", "nan_logits.npy", "--labels", "test_labels.npy"],
            "n_mismatch": ["evaluate", "--logits", "test_logits.npy", "--labels", "short_labels.npy"],
            "bad_fail_on": ["evaluate", *test, "--fail-on", "ece>>0.03"],
            "unsafe_bind": ["serve", "--host", "0.0.0.0", "--port", "1"],
            "usage": ["evaluate", "--labels", "test_labels.npy"],
        },
        work,
    )
    assert_ok(first["fit"])
    assert_ok(first["fit_venn_abers"])
    apply_va = ["apply", "--logits", "test_logits.npy", "--out"]
    second = run_all(
        {
            "apply_intervals": [
                *apply_va,
                "va_p.npy",
                "--calibrator",
                "va.json",
                "--intervals-out",
                "va_i.npy",
            ],
            "apply_intervals_temperature": [
                *(*apply_va, "t_p.npy", "--calibrator", "calibrator.json", "--intervals-out", "t_i.npy"),
            ],
            "apply": [
                "apply",
                "--logits",
                "test_logits.npy",
                "--calibrator",
                "calibrator.json",
                "--out",
                "p.npy",
            ],
            "evaluate": [
                "evaluate",
                *test,
                "--calibrator=calibrator.json",
                "--fail-on=ece>0.03",
                "--fail-on=uncalibrated.accuracy<0.9",
                "--baseline=calibrator.json",
                "--max-increase=ece=0.02,nll=0.05",
                *(
                    "--out",
                    "report.json",
                    "--out",
                    "report.xml",
                    "--out",
                    "report.md",
                    "--out",
                    "report.html",
                ),
                *("--plot", "reliability.png"),
            ],
            # the statistical tests of calibration gate a build through the same --fail-on
            "spiegelhalter_gate": [
                *("evaluate", *test, "--calibrator=calibrator.json"),
                *(
                    "--fail-on",
                    "uncalibrated.spiegelhalter_p<0.01",
                    "--fail-on",
                    "calibrated.ks_calibration_p<0.01",
                ),
                *("--out", "spiegelhalter.json", "--out", "spiegelhalter.xml", "--out", "spiegelhalter.md"),
            ],
            # a bound of the bootstrap interval: miscalibrated beyond the bootstrap's doubt (lower bound)
            "interval_gate": [
                *("evaluate", *test, "--calibrator=calibrator.json", "--bootstrap", "200"),
                *("--fail-on", "uncalibrated.ece.lower>0.03", "--fail-on", "calibrated.ece.upper>0.03"),
                *("--out", "interval.json", "--out", "interval.xml", "--out", "interval.md"),
            ],
            "bound_without_bootstrap": ["evaluate", *test, "--fail-on", "ece.upper>0.03"],
            "uncalibrated_breach": [
                "evaluate",
                *test,
                "--fail-on",
                "ece>0.03",
                "--format",
                "junit",
                "--bins",
                "10",
                "--binning",
                "mass",
            ],
        },
        work,
    )
    third = run_all(
        {
            "drift": [
                "drift",
                *("--logits", "overconfident_logits.npy", "--labels", "test_labels.npy"),
                *("--calibrator", "calibrator.json", "--baseline", "report.json"),
                *("--out", "drift.json", "--out", "drift.xml", "--plot", "drift.svg"),
            ],
            "no_drift": [
                "drift",
                *test,
                *("--calibrator", "calibrator.json", "--baseline", "report.json", "--format", "markdown"),
            ],
        },
        work,
    )
    return first | second | third


def load(work: Path, name: str) -> dict:
    return orjson.loads((work / name).read_bytes())


# --------------------------------------------------------------------------------------------------- fit


def test_fit_writes_a_calibrator_document_with_the_reference_temperature(runs, work):
    document = load(work, "calibrator.json")
    assert document["method"] == "temperature" and document["model"] == "wrn"
    assert document["temperature"] == pytest.approx(REFERENCE["temperature"], abs=1e-4)
    assert document["num_classes"] == 10 and document["fit"]["n"] == 5000
    assert document["fit"]["after"]["nll"] < document["fit"]["before"]["nll"]
    assert "fitted temperature T = 2.039" in runs["fit"].stderr


def test_fit_from_csv_and_jsonl_gives_the_same_calibrator(runs, work):
    assert_ok(runs["fit_text"])
    from_text, from_npz = load(work, "text.json"), load(work, "calibrator.json")
    # the CSV holds each float32 logit to 9 significant digits, read back as float64
    assert from_text["temperature"] == pytest.approx(from_npz["temperature"], abs=1e-6)
    assert from_text["fit"]["n"] == 5000
    for name in ("ece", "nll", "brier"):
        assert from_text["fit"]["after"][name] == pytest.approx(from_npz["fit"]["after"][name], abs=1e-7)


def test_fit_then_apply_gives_the_probabilities_evaluate_measured(runs, work):
    assert_ok(runs["apply"])
    probabilities = np.load(work / "p.npy")
    logits = np.load(work / "test_logits.npy").astype(np.float64)
    labels = np.load(work / "test_labels.npy")
    temperature = load(work, "calibrator.json")["temperature"]
    scaled = logits / temperature
    expected = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    # float64 both ways from the same float32 logits: equal to float64 rounding, relative for tiny probabilities
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12, atol=1e-15)

    calibrated = load(work, "report.json")["calibrated"]
    assert calibrated["nll"] == pytest.approx(log_loss(labels, probabilities, labels=range(10)), abs=1e-9)
    one_vs_rest = [brier_score_loss(labels == k, probabilities[:, k]) for k in range(10)]
    assert calibrated["brier"] == pytest.approx(sum(one_vs_rest), abs=1e-9)
    assert calibrated["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == labels))


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_reference_figures_and_passes(runs, work):
    assert_ok(runs["evaluate"])
    report = load(work, "report.json")
    assert report["kind"] == "calibserve.evaluation" and report["n"] == 5000
    for group in ("uncalibrated", "calibrated"):
        for name, value in REFERENCE[group].items():
            assert report[group][name] == pytest.approx(value, abs=2e-6), (group, name)
    assert 1 - report["calibrated"]["accuracy"] == pytest.approx(REFERENCE["error"], abs=1e-4)
    assert report["conventions"]["n_bins"] == 15 and report["conventions"]["binning"] == "width"
    assert report["calibrator"]["temperature"] == pytest.approx(REFERENCE["temperature"], abs=1e-4)
    checks = {check["name"]: check for check in report["thresholds"]}
    assert list(checks) == [
        "ece>0.03",
        "uncalibrated.accuracy<0.9",
        "ece increase <= 0.02",
        "nll increase <= 0.05",
    ]
    assert all(check["status"] == "pass" for check in checks.values())
    # --baseline calibrator.json compares with the figures measured at fit time (on the val half)
    fit_after = load(work, "calibrator.json")["fit"]["after"]
    assert checks["ece increase <= 0.02"]["baseline"] == fit_after["ece"]
    assert report["summary"] == {"checks": 4, "passed": 4, "failed": 0, "status": "pass"}


def test_junit_report_has_the_required_structure(runs, work):
    root = ET.parse(work / "report.xml").getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [
        c["name"] for c in load(work, "report.json")["thresholds"]
    ]
    for element in (root, suite):
        assert (element.get("tests"), element.get("failures"), element.get("errors")) == ("4", "0", "0")
    assert suite.get("name") == "calibserve"
    assert all(case.get("classname") == "calibserve.calibration" for case in cases)
    assert all(case.find("failure") is None for case in cases)


def test_markdown_html_and_png_reports(runs, work):
    markdown = (work / "report.md").read_text()
    ece = load(work, "report.json")["calibrated"]["ece"]
    assert "| figure | uncalibrated | calibrated | change |" in markdown
    assert re.search(rf"^\| ece \| 0\.05522 \| {ece:.4g} \| -0\.04877 \|$", markdown, re.M)
    assert "| ✅ | `ece>0.03` |" in markdown

    png = (work / "reliability.png").read_bytes()
    assert png_size(png) == (600, 700)
    page = (work / "report.html").read_text()
    (encoded,) = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(encoded) == png  # the same diagram, drawn once
    assert "<td>ece&gt;0.03</td>" in page


def test_a_breached_threshold_exits_1_and_junit_goes_to_stdout(runs):
    run = runs["uncalibrated_breach"]
    assert_ok(run, 1)
    root = ET.fromstring(run.stdout)
    (case,) = root.iter("testcase")
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "threshold"
    assert re.fullmatch(r"ece = 0\.0\d+ > 0\.03", failure.get("message"))
    assert root.find("testsuite").get("failures") == "1"
    assert "breached ece>0.03" in run.stderr


def test_fail_on_a_p_value_of_a_calibration_test(runs, work):
    """The uncalibrated WRN is far from calibrated (Spiegelhalter's p ~ 1e-304); after temperature scaling
    the cumulative KS test no longer rejects at 1 %. Markdown and JUnit list each statistic with its p-value."""
    run = runs["spiegelhalter_gate"]
    assert_ok(run, 1)
    report = load(work, "spiegelhalter.json")
    checks = {check["name"]: check for check in report["thresholds"]}
    breached = checks["uncalibrated.spiegelhalter_p<0.01"]
    assert breached["status"] == "fail" and breached["value"] < 1e-100
    held = checks["calibrated.ks_calibration_p<0.01"]
    assert held["status"] == "pass" and held["value"] > 0.01
    assert report["uncalibrated"]["spiegelhalter_z"] > 30  # over-confident: more errors than forecast
    assert report["uncalibrated"]["calibration_slope"] < 1
    for name in ("spiegelhalter", "ks_calibration", "hosmer_lemeshow", "ici"):
        assert name in report["conventions"]
    markdown = (work / "spiegelhalter.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in markdown.splitlines() if line.startswith("| ")]
    tests = rows[rows.index("spiegelhalter_z") :]
    assert tests[:4] == ["spiegelhalter_z", "spiegelhalter_p", "ks_calibration", "ks_calibration_p"]
    assert "hosmer_lemeshow_p" in tests and "ici" in tests
    junit = (work / "spiegelhalter.xml").read_text()
    assert "spiegelhalter_z\t" in junit and "kuiper_calibration_p\t" in junit
    assert "breached uncalibrated.spiegelhalter_p<0.01" in run.stderr
    # each p-value gate names its test and shows its statistic beside the p-value, in JUnit and Markdown
    assert breached["test"] == "Spiegelhalter's Z test" and breached["statistic"] == "spiegelhalter_z"
    assert breached["statistic_value"] == report["uncalibrated"]["spiegelhalter_z"]
    assert held["statistic_value"] == report["calibrated"]["ks_calibration"]
    root = ET.fromstring(junit)
    cases = {case.get("name"): case for case in root.iter("testcase")}
    failure = cases["uncalibrated.spiegelhalter_p<0.01"].find("failure")
    assert "Spiegelhalter's Z test: spiegelhalter_z = " in failure.get("message")
    assert "statistic_value: " in failure.text
    passed = cases["calibrated.ks_calibration_p<0.01"].find("system-out").text
    assert "Kolmogorov-Smirnov test of the cumulative calibration curve: ks_calibration = " in passed
    assert "Spiegelhalter's Z test: spiegelhalter_z = " in markdown
    assert "ks_calibration = " in markdown


def test_fail_on_a_bound_of_the_bootstrap_interval(runs, work):
    """``uncalibrated.ece.lower>0.03``: the WRN's ECE (0.055) is above 0.03 beyond the bootstrap's doubt;
    ``calibrated.ece.upper>0.03`` holds after temperature scaling. Without --bootstrap, exit 2 at once."""
    run = runs["interval_gate"]
    assert_ok(run, 1)
    report = load(work, "interval.json")
    checks = {check["name"]: check for check in report["thresholds"]}
    lower = checks["uncalibrated.ece.lower>0.03"]
    assert lower["status"] == "fail" and lower["bound"] == "lower" and lower["interval"] == "basic"
    assert lower["value"] == report["intervals"]["uncalibrated"]["ece"][0]
    assert lower["estimate"] == report["uncalibrated"]["ece"]
    upper = checks["calibrated.ece.upper>0.03"]
    assert upper["status"] == "pass" and upper["value"] == report["intervals"]["calibrated"]["ece"][1]
    assert report["conventions"]["bootstrap"]["interval"]["ece"] == "basic"
    assert "ece.lower = " in (work / "interval.md").read_text()
    assert "basic interval of ece = " in (work / "interval.xml").read_text()
    refused = runs["bound_without_bootstrap"]
    assert refused.returncode == 2 and "--bootstrap N" in refused.stderr


# ------------------------------------------------------------------------------------------------- drift


def test_an_overconfident_model_is_caught_as_drift(runs, work):
    run = runs["drift"]
    assert_ok(run, 1)
    baseline = load(work, "report.json")
    drift = load(work, "drift.json")
    (check,) = drift["thresholds"]  # the default --max-increase ece=0.01, on calibrated figures
    assert (check["metric"], check["group"], check["limit"], check["status"]) == (
        "ece",
        "calibrated",
        0.01,
        "fail",
    )
    assert check["baseline"] == baseline["calibrated"]["ece"]  # the JSON report round-trips as a baseline
    assert check["change"] == pytest.approx(drift["calibrated"]["ece"] - baseline["calibrated"]["ece"])
    assert check["change"] > 0.05  # T fitted for the old logits leaves the x3 logits over-confident
    (failure,) = ET.parse(work / "drift.xml").getroot().iter("failure")
    assert failure.get("message").startswith("ece rose by ")
    svg = ET.parse(work / "drift.svg").getroot()
    assert svg.tag.endswith("svg") and svg.get("width") == "432pt"


def test_the_same_model_does_not_drift(runs):
    run = runs["no_drift"]
    assert_ok(run, 0)
    assert "| ✅ | `ece increase <= 0.01` |" in run.stdout.decode()


# ------------------------------------------------------------------------------------------------ errors

ERRORS = {
    "missing_file": "No such file or directory: absent.npy",
    "bad_shape": "logits must be 2-D (n_samples, n_classes), got 3-D",
    "nan": "logits contains NaN or Inf at row 3",
    "n_mismatch": "labels has 4999 entries but the scores have 5000 rows",
    "bad_fail_on": "threshold 'ece>>0.03' must look like 'ece>0.03'",
    "unsafe_bind": "refusing to listen on 0.0.0.0 without API keys",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_failed_evaluation_exits_2_with_one_line(runs, case):
    run = runs[case]
    assert run.returncode == 2, run.stderr
    assert run.stdout == b""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("calibserve: error: ")
    assert ERRORS[case] in lines[0]


def test_a_usage_error_exits_2(runs):
    assert runs["usage"].returncode == 2
    assert "one of the arguments --logits --probabilities --inputs is required" in runs["usage"].stderr


# --------------------------------------------------------------------------------------------- in-process


def test_serve_flags_win_over_the_environment(monkeypatch, tmp_path):
    import service.api.server

    seen = []
    monkeypatch.setattr(service.api.server, "serve", seen.append)
    monkeypatch.setenv("CALIBSERVE_PORT", "7000")
    monkeypatch.setenv("CALIBSERVE_WORKERS", "3")
    monkeypatch.setenv("CALIBSERVE_STORE_DIR", str(tmp_path / "env-store"))
    assert cli.main(["serve", "--port", "9001", "--store-dir", str(tmp_path / "flag-store")]) == 0
    (settings,) = seen
    assert (settings.port, settings.workers, settings.store_dir) == (9001, 3, tmp_path / "flag-store")


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = io.StringIO()
    bar = cli.Progress("bootstrap", stream=quiet)
    bar(1, 2)
    bar.close()
    assert quiet.getvalue() == ""

    terminal = Terminal()
    bar = cli.Progress("bootstrap", stream=terminal, width=10)
    bar(1, 2)
    bar(2, 2)
    bar.close()
    assert terminal.getvalue() == "\rbootstrap [#####-----]  50%\rbootstrap [##########] 100%\n"


def test_options_are_read_as_json_values():
    assert cli._parse_option("max_iter=50") == ("max_iter", 50)
    assert cli._parse_option("bounds=[0.1, 10]") == ("bounds", [0.1, 10])
    assert cli._parse_option("objective=nll") == ("objective", "nll")
    with pytest.raises(cli.CommandError, match="key=value"):
        cli._parse_option("oops")


# -------------------------------------------------------------------------------------------- client mode


@pytest.fixture(scope="module")
def remote(runs, work, tmp_path_factory) -> dict:
    """The CLI in client mode against a live service holding the local calibrator (uploaded, active)."""
    from service.client import CalibserveClient
    from tests.helpers.servers import Server

    store = tmp_path_factory.mktemp("cli-store")
    with Server(store, env={"CALIBSERVE_API_KEYS": "cli-admin-key:admin"}) as server:
        with CalibserveClient(server.url, api_key="cli-admin-key") as client:
            client.put_model("wrn", num_classes=10)
            uploaded = client.upload_calibrator("wrn", load(work, "calibrator.json"))
        flags = ["--server", server.url, "--model", "wrn"]
        test = ["--logits", "test_logits.npy", "--labels", "test_labels.npy"]
        results = run_all(
            {
                "fit": [
                    *("fit", f"--logits={DATA}:logits_val", f"--labels={DATA}:labels_val", "--no-activate"),
                    *flags,
                ],
                "evaluate": [
                    *("evaluate", *test, "--fail-on", "ece>0.03", "--baseline", "report.json"),
                    *("--out", "remote.json", *flags),
                ],
                "apply": ["apply", "--logits", "test_logits.npy", "--out", "remote_p.jsonl", *flags],
                # --api-key wins over CALIBSERVE_API_KEY (which holds the valid key)
                "unauthorized": ["evaluate", *test, *flags, "--api-key", "not-a-key"],
                "export": ["export", "--server", server.url, "--model", "digits-mlp", "--out", "digits.pt"],
            },
            work,
            env={"CALIBSERVE_API_KEY": "cli-admin-key"},
        )
    return {"uploaded": uploaded, **results}


def test_client_mode_gives_the_same_figures_as_local_mode(remote, work):
    unauthorized = remote["unauthorized"]
    assert unauthorized.returncode == 2 and unauthorized.stderr.startswith("calibserve: error: 401 ")
    for name in ("fit", "evaluate", "apply"):
        assert_ok(remote[name])
    document = orjson.loads(remote["fit"].stdout)  # no --out: the document goes to stdout
    assert document["version"] != remote["uploaded"]["version"]
    # the service fitted the same temperature from the same data sent as JSON (see the tolerance below)
    assert document["temperature"] == pytest.approx(load(work, "calibrator.json")["temperature"], abs=1e-6)

    local, remote_report = load(work, "report.json"), load(work, "remote.json")
    assert remote_report["calibrator"]["version"] == remote["uploaded"]["version"]  # fit was --no-activate
    # float32 logits travel as their shortest decimal, which the service reads as float64: the inputs differ
    # by float32 rounding (~1e-7 relative), the figures by ~1e-9 (measured: at most 5e-9)
    for group in ("uncalibrated", "calibrated"):
        for name, value in local[group].items():
            assert remote_report[group][name] == pytest.approx(value, rel=0, abs=1e-7), (group, name)
    assert [c["status"] for c in remote_report["thresholds"]] == ["pass", "pass"]
    remote_probabilities = np.array(
        [orjson.loads(line) for line in (work / "remote_p.jsonl").read_bytes().splitlines()]
    )
    # the same temperature on logits that differ by half a float32 ulp each (|dz| <= EPS32 / 2 * |z|): log p
    # moves by at most 2 max|dz| / T, so each probability by that much relative to itself; twice that allowed
    temperature = load(work, "calibrator.json")["temperature"]
    rtol = 2 * EPS32 * float(np.abs(np.load(work / "test_logits.npy")).max()) / temperature
    np.testing.assert_allclose(remote_probabilities, np.load(work / "p.npy"), rtol=rtol, atol=1e-15)


def test_export_writes_the_served_model(remote, work):
    run = remote["export"]
    if run.returncode == 2 and "404" in run.stderr and "digits-mlp" not in run.stderr:
        pytest.skip(f"the export route is not there yet: {run.stderr.strip()}")
    assert_ok(run)
    assert (work / "digits.pt").read_bytes()[:2] == b"PK"  # TorchScript files are zip archives


def test_venn_abers_fit_and_apply_write_probability_intervals(runs, work):
    from service.core.calibrators import calibrator_from_dict

    assert_ok(runs["apply_intervals"])
    fitted = calibrator_from_dict(orjson.loads((work / "va.json").read_bytes()))
    logits = np.load(work / "test_logits.npy")
    np.testing.assert_allclose(np.load(work / "va_p.npy"), fitted.transform(logits), rtol=1e-12)
    np.testing.assert_allclose(np.load(work / "va_i.npy"), fitted.transform_intervals(logits), rtol=1e-12)
    refused = runs["apply_intervals_temperature"]
    assert_ok(refused, 2)
    assert "intervals come from a venn_abers calibrator, not temperature" in refused.stderr
