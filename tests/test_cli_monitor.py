"""Live monitoring from the outside: the client's ``outcomes``, ``monitoring`` and ``refit``, and ``calibserve
monitor`` (exit codes, reports) against a real ``calibserve serve`` with the prediction log on.

A calibrator is fitted on the real CIFAR-10 validation logits, the test half is calibrated through the service
(each row gets a prediction id), and the test labels are posted as outcomes by id: the window then holds the
5000 served rows, whose figures must be those ``POST /v1/metrics`` computes from the same probabilities.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from service import reports, workflows
from service.client import AsyncCalibserveClient, CalibserveClient
from service.errors import InvalidInput
from tests.helpers.cli import Run, run_all
from tests.helpers.data import CIFAR10, load_arrays
from tests.helpers.servers import Server

MIN_OUTCOMES = 50
QUIET_OUTCOMES = 10  # a model whose window has fewer outcomes than the server judges
WINDOW = "1h"
# the figures both the window and POST /v1/metrics compute
COMPARED = ("ece", "mce", "brier", "nll", "accuracy", "overconfidence", "underconfidence")


def explain(run: Run) -> str:
    return f"{run.args}: exit {run.returncode}, stderr:\n{run.stderr}"


@dataclass
class Live:
    server: Server
    work: Path
    fitted: dict
    probabilities: np.ndarray
    labels: np.ndarray
    ids: list[str]
    first_post: dict
    quiet_ids: list[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    data = load_arrays(CIFAR10)
    store = tmp_path_factory.mktemp("monitor-store")
    models = tmp_path_factory.mktemp("monitor-models")  # empty: logits-only models declared here
    work = tmp_path_factory.mktemp("monitor-work")
    env = {"CALIBSERVE_PREDICTION_LOG": "on", "CALIBSERVE_MONITORING_MIN_OUTCOMES": str(MIN_OUTCOMES)}
    with Server(store, models=models, env=env) as server:
        with CalibserveClient(server.url, timeout=60.0) as client:
            for name in ("wrn", "quiet"):
                client.put_model(name, num_classes=10)
                fitted = client.fit(name, logits=data["logits_val"], labels=data["labels_val"])
            answer = client.calibrate("wrn", logits=data["logits_test"])
            ids = answer["prediction_ids"]
            first_post = client.outcomes("wrn", prediction_ids=ids, labels=data["labels_test"])
            quiet = client.calibrate("quiet", logits=data["logits_test"][:QUIET_OUTCOMES])
            client.outcomes(
                "quiet", prediction_ids=quiet["prediction_ids"], labels=data["labels_test"][:QUIET_OUTCOMES]
            )
        yield Live(
            server,
            work,
            fitted,
            answer["probabilities"],
            np.asarray(data["labels_test"]),
            ids,
            first_post,
            quiet["prediction_ids"],
        )


@pytest.fixture(scope="module")
def runs(live) -> dict[str, Run]:
    """``calibserve monitor`` runs, started together."""
    wrn = ["monitor", "--server", live.server.url, "--model", "wrn", "--window", WINDOW]
    quiet = ["monitor", "--server", live.server.url, "--model", "quiet", "--window", WINDOW]
    return run_all(
        {
            "pass": [
                *wrn,
                *("--fail-on", "ece+0.5", "--calibrator-version", str(live.fitted["version"])),
                *("--out", "pass.json", "--out", "pass.md", "--out", "pass.html"),
            ],
            "breach": [*wrn, "--fail-on", "ece>0.0001", "--out", "breach.xml"],
            "server_rules": [*wrn, "--format", "json"],  # no --fail-on, report on stdout
            "malformed": [*wrn, "--fail-on", "ece>>0.1"],
            "unknown_figure": [*wrn, "--fail-on", "ece_classwise>0.1"],
            "bad_window": [*wrn[:-1], "5 minutes"],
            "quiet": [*quiet, "--fail-on", "ece>0.0001", "--out", "quiet.xml"],
            "quiet_required": [*quiet, "--fail-on", "ece>0.0001", "--require-outcomes"],
        },
        live.work,
    )


# ------------------------------------------------------------------------------------------------- client


def test_outcomes_by_id_count_once_and_a_second_post_reports_repeats(live):
    n = len(live.labels)
    assert len(live.ids) == n and len(set(live.ids)) == n
    assert {key: live.first_post[key] for key in ("counted", "repeat", "unknown", "invalid")} == {
        "counted": n,
        "repeat": 0,
        "unknown": 0,
        "invalid": 0,
    }
    assert [result["status"] for result in live.first_post["results"]] == ["counted"] * n
    with CalibserveClient(live.server.url) as client:
        again = client.outcomes(
            "wrn",
            prediction_ids=[*live.ids[:20], "0000000000000000.0", live.quiet_ids[0]],
            labels=[*live.labels[:20].tolist(), 0, 0],
        )
        window = client.monitoring("wrn", window=WINDOW)
    assert (again["counted"], again["repeat"], again["unknown"], again["invalid"]) == (0, 20, 2, 0)
    assert [result["prediction_id"] for result in again["results"][:20]] == live.ids[:20]
    # another model's id is unknown here; nothing of the second post counted
    assert [result["status"] for result in again["results"][20:]] == ["unknown", "unknown"]
    assert window["figures"]["n"] == n


def test_monitoring_figures_equal_those_of_post_metrics_on_the_served_probabilities(live):
    with CalibserveClient(live.server.url, timeout=60.0) as client:
        window = client.monitoring("wrn", window=WINDOW)
        pinned = client.monitoring("wrn", window=WINDOW, calibrator_version=live.fitted["version"])
        figures = client.metrics(probabilities=live.probabilities, labels=live.labels)
    assert window["model"] == "wrn" and window["window"] == WINDOW and window["window_seconds"] == 3600
    assert window["calibrator_version"] == live.fitted["version"]
    assert pinned["figures"] == window["figures"]
    measured = window["figures"]
    assert measured["n"] == len(live.labels)
    for name in COMPARED:
        assert measured[name] == pytest.approx(figures[name], rel=1e-9, abs=0), name
    assert [b["count"] for b in measured["bins"]] == figures["reliability"]["counts"]
    # and those of tests/data/README.md (temperature scaling fitted on the validation half, test half)
    assert measured["ece"] == pytest.approx(0.006447, abs=2e-6)
    assert measured["nll"] == pytest.approx(0.276111, abs=2e-6)
    assert window["drift"]["state"] in ("ok", "drift")  # judged: 5000 outcomes >= 50
    assert window["drift"]["min_outcomes"] == MIN_OUTCOMES
    assert window["label_free"]["predictions"] == len(live.labels)
    expected_accuracy = float(np.mean(live.probabilities.max(axis=1)))
    assert window["label_free"]["expected_accuracy"] == pytest.approx(expected_accuracy, rel=1e-9)


def test_refit_stores_a_new_version_and_leaves_the_active_one(live):
    with CalibserveClient(live.server.url, timeout=60.0) as client:
        answer = client.refit("wrn", window=WINDOW, holdout=0.3, activate=False, seed=1)
        stored = client.get_calibrator("wrn", answer["calibrator"]["version"])
        active = client.monitoring("wrn", window=WINDOW)["calibrator_version"]  # the active version's
    assert answer["calibrator"]["version"] > live.fitted["version"]
    assert answer["activated"] is False and active == live.fitted["version"]
    assert answer["n_fit"] + answer["n_holdout"] == len(live.labels)
    assert answer["n_holdout"] == round(0.3 * len(live.labels))
    assert answer["holdout"]["active"]["version"] == live.fitted["version"]
    assert answer["improves_nll"] == (answer["holdout"]["new"]["nll"] < answer["holdout"]["active"]["nll"])
    assert stored["method"] == "temperature" and stored["fit"]["n"] == answer["n_fit"]


def test_outcomes_of_labelled_logits_are_counted_and_logged(live):
    data = load_arrays(CIFAR10)
    with CalibserveClient(live.server.url) as client:
        client.put_model("batch", num_classes=10)
        fitted = client.fit("batch", logits=data["logits_val"], labels=data["labels_val"])
        answer = client.outcomes(
            "batch",
            logits=data["logits_test"][:7],
            labels=data["labels_test"][:7],
            calibrator_version=fitted["version"],
        )
        window = client.monitoring("batch", window=WINDOW)
    assert answer["counted"] == 7 and len({r["prediction_id"] for r in answer["results"]}) == 7
    assert window["figures"]["n"] == 7 and window["drift"]["state"] == "too_few_outcomes"


class Recorder:
    """A MockTransport handler answering from a script, keeping the requests it saw."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def mock_client(recorder: Recorder) -> CalibserveClient:
    return CalibserveClient("http://calibserve.test", transport=httpx.MockTransport(recorder), backoff=0.0)


def test_outcomes_by_id_are_retried_after_a_lost_answer_but_labelled_scores_and_refits_are_not():
    recorder = Recorder(httpx.ReadTimeout("slow"), httpx.Response(200, json={"counted": 1}))
    with mock_client(recorder) as client:
        assert client.outcomes("m", prediction_ids=np.array(["a.0"]), labels=np.array([3])) == {"counted": 1}
    assert len(recorder.requests) == 2
    assert json.loads(recorder.requests[0].content) == {"prediction_ids": ["a.0"], "labels": [3]}
    assert recorder.requests[0].url.path == "/v1/models/m/outcomes"

    for send in (
        lambda c: c.outcomes("m", logits=[[0.0, 1.0]], labels=[1], calibrator_version=2),
        lambda c: c.refit("m"),
    ):
        recorder = Recorder(httpx.ReadTimeout("slow"), httpx.Response(201, json={}))
        with mock_client(recorder) as client, pytest.raises(httpx.ReadTimeout):
            send(client)
        assert len(recorder.requests) == 1
    # refused before any work (503): retried, for a refit too
    recorder = Recorder(httpx.Response(503), httpx.Response(201, json={"activated": True}))
    with mock_client(recorder) as client:
        assert client.refit("m a", window="7d", activate="if_better", options={"max_iter": 5}) == {
            "activated": True
        }
    assert recorder.requests[1].url.raw_path == b"/v1/models/m%20a/refit"
    assert json.loads(recorder.requests[1].content) == {
        "window": "7d",
        "method": "temperature",
        "options": {"max_iter": 5},
        "holdout": 0.3,
        "activate": "if_better",
        "seed": 0,
    }


def test_outcomes_take_one_kind_of_rows_and_monitoring_sends_its_query():
    recorder = Recorder(httpx.Response(200, json={"figures": {}}))
    with mock_client(recorder) as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.outcomes("m", labels=[0])
        with pytest.raises(ValueError, match="exactly one"):
            client.outcomes("m", prediction_ids=["a.0"], logits=[[0.0, 1.0]], labels=[0])
        with pytest.raises(ValueError, match="calibrator_version"):
            client.outcomes("m", prediction_ids=["a.0"], labels=[0], calibrator_version=1)
        assert not recorder.requests
        client.monitoring("m")
        client.monitoring("m", window="24h", calibrator_version=3)
    assert [dict(request.url.params) for request in recorder.requests] == [
        {"window": "1h"},
        {"window": "24h", "calibrator_version": "3"},
    ]
    assert all(request.method == "GET" for request in recorder.requests)


def test_the_async_client_has_the_monitoring_routes():
    recorder = Recorder(
        httpx.Response(200, json={"counted": 2}), httpx.Response(201, json={"activated": False})
    )

    async def scenario():
        transport = httpx.MockTransport(recorder)
        async with AsyncCalibserveClient("http://calibserve.test", transport=transport) as client:
            return (
                await client.outcomes("m", prediction_ids=["a.0", "a.1"], labels=[0, 1]),
                await client.refit("m", holdout=0.5),
            )

    assert asyncio.run(scenario()) == ({"counted": 2}, {"activated": False})
    assert json.loads(recorder.requests[1].content)["holdout"] == 0.5


# ----------------------------------------------------------------------------------------------------- CLI


def test_monitor_passes_a_loose_drift_rule_against_the_fit_time_figures(runs, live):
    run = runs["pass"]
    assert run.returncode == 0, explain(run)
    report = orjson.loads((live.work / "pass.json").read_bytes())
    assert report["kind"] == workflows.REPORT_KIND and report["n"] == len(live.labels)
    assert report["num_classes"] == 10 and report["calibrator"]["version"] == live.fitted["version"]
    (check,) = report["thresholds"]
    fit_ece = live.fitted["fit"]["after"]["ece"]
    assert check["kind"] == "drift" and check["name"] == "ece+0.5" and check["status"] == "pass"
    assert check["baseline"] == fit_ece and check["value"] == report["calibrated"]["ece"]
    assert check["change"] == pytest.approx(check["value"] - fit_ece, abs=1e-15)
    assert report["summary"] == {"checks": 1, "passed": 1, "failed": 0, "unknown": 0, "status": "pass"}
    monitoring = report["monitoring"]
    assert monitoring["window"] == WINDOW and monitoring["outcomes"] == len(live.labels)
    assert monitoring["judged"] is True and monitoring["min_outcomes"] == MIN_OUTCOMES
    assert monitoring["label_free"]["predictions"] == len(live.labels)
    assert sum(report["reliability"]["calibrated"]["counts"]) == len(live.labels)
    markdown = (live.work / "pass.md").read_text()
    assert markdown.startswith(f"### calibserve calibration report {reports.PASS_MARK} pass")
    assert f"Monitoring window {WINDOW}: {len(live.labels)} outcomes" in markdown
    html_page = (live.work / "pass.html").read_text()
    assert "data:image/png;base64," in html_page and "Monitoring window" in html_page
    assert "label-free" in run.stderr and f"window {WINDOW} of model wrn" in run.stderr


def test_monitor_breaches_a_threshold_and_writes_junit(runs, live):
    run = runs["breach"]
    assert run.returncode == 1, explain(run)
    assert "breached ece>0.0001" in run.stderr
    root = ET.fromstring((live.work / "breach.xml").read_bytes())
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite.get("tests") == "1" and suite.get("failures") == "1"
    (case,) = suite.findall("testcase")
    assert case.get("name") == "ece>0.0001"
    assert case.find("failure").get("message").startswith("ece = ")
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["window"] == WINDOW and properties["outcomes"] == str(len(live.labels))
    assert properties["drift_state"] in ("ok", "drift")


def test_monitor_without_rules_uses_the_server_drift_checks(runs):
    run = runs["server_rules"]
    report = orjson.loads(run.stdout)
    assert report["monitoring"]["rules"] == "server"
    assert [check["name"] for check in report["thresholds"]] == [
        check["name"] for check in report["monitoring"]["drift"]["checks"]
    ]
    failed = any(check["status"] == "fail" for check in report["thresholds"])
    assert run.returncode == (1 if failed else 0), explain(run)
    assert (report["monitoring"]["drift"]["state"] == "drift") == failed


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("malformed", "'ece>>0.1' must be a drift rule such as 'ece+0.02'"),
        ("unknown_figure", "unknown figure 'ece_classwise'"),
        ("bad_window", "--window '5 minutes' must be a duration"),
    ],
)
def test_monitor_refuses_bad_input_with_one_line(runs, case, reason):
    run = runs[case]
    assert run.returncode == 2, explain(run)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibserve: error: ") and reason in lines[0], lines


def test_a_window_with_too_few_outcomes_passes_unjudged_unless_outcomes_are_required(runs, live):
    run = runs["quiet"]
    assert run.returncode == 0, explain(run)
    assert "too few outcomes to judge: 10" in run.stderr
    suite = ET.fromstring((live.work / "quiet.xml").read_bytes()).find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("0", "1")
    assert suite.find("testcase").find("skipped") is not None

    required = runs["quiet_required"]
    assert required.returncode == 1, explain(required)
    report = orjson.loads(required.stdout)
    assert [(c["name"], c["status"]) for c in report["thresholds"]] == [
        ("ece>0.0001", "unknown"),
        (f"outcomes>={MIN_OUTCOMES}", "fail"),
    ]
    assert report["summary"] == {"checks": 2, "passed": 0, "failed": 1, "unknown": 1, "status": "fail"}


# -------------------------------------------------------------------------------- the report, offline


def window_answer(n: int = 200, *, ece: float = 0.05, accuracy: float = 0.8, state: str = "ok") -> dict:
    """A monitoring answer shaped as the server's, with made-up figures."""
    bins = [
        {
            "lower": i / 15,
            "upper": (i + 1) / 15,
            "count": n if i == 12 else 0,
            "confidence": None,
            "accuracy": None,
        }
        for i in range(15)
    ]
    figures = {
        "n": n,
        "ece": ece,
        "mce": ece,
        "brier": 0.3,
        "nll": 0.6,
        "accuracy": accuracy,
        "mean_confidence": accuracy + ece,
        "overconfidence": ece,
        "underconfidence": 0.0,
        "bins": bins,
    }
    rule = {"name": "ece+0.02", "kind": "drift", "metric": "ece", "op": "rise>", "limit": 0.02}
    rule |= {"value": ece, "baseline": 0.01, "change": ece - 0.01, "status": "fail"}
    return {
        "model": "m",
        "window": "1h",
        "window_seconds": 3600,
        "calibrator_version": 3,
        "figures": figures,
        "label_free": {"predictions": n, "expected_accuracy": 0.85, "realised_accuracy": accuracy},
        "drift": {"state": state, "min_outcomes": 100, "baseline": "fit", "checks": [rule]},
    }


DOCUMENT = {
    "version": 3,
    "method": "temperature",
    "temperature": 1.5,
    "fit": {"after": {"ece": 0.01, "accuracy": 0.9}},
}


def test_drift_rules_compare_with_the_fit_time_figures_in_both_directions():
    rules = [workflows.parse_monitor_rule(text) for text in ("ece+0.02", "accuracy-0.05", "ece<0.1")]
    report = workflows.monitoring_report(window_answer(), calibrator_document=DOCUMENT, rules=rules)
    ece, accuracy, threshold = report["thresholds"]
    assert (ece["status"], ece["change"]) == ("fail", pytest.approx(0.04))
    assert (accuracy["status"], accuracy["change"], accuracy["op"]) == ("fail", pytest.approx(0.1), "fall>")
    assert threshold["kind"] == "fail_on" and threshold["status"] == "fail"
    assert reports.check_message(ece) == "ece rose by 0.04 (0.05 against fit-time 0.01); allowed rise 0.02"
    assert reports.check_message(accuracy) == (
        "accuracy fell by 0.1 (0.8 against fit-time 0.9); allowed fall 0.05"
    )
    assert report["calibrator"] == {"version": 3, "method": "temperature", "temperature": 1.5}
    loose = workflows.monitoring_report(
        window_answer(), calibrator_document=DOCUMENT, rules=[workflows.parse_monitor_rule("accuracy-0.2")]
    )
    assert loose["summary"]["status"] == "pass"


def test_rules_that_cannot_be_checked_are_refused():
    with pytest.raises(InvalidInput, match="must be a drift rule"):
        workflows.parse_monitor_rule("ece+")
    drift = [workflows.parse_monitor_rule("ece+0.02")]
    with pytest.raises(InvalidInput, match="without a calibrator"):
        workflows.monitoring_report({**window_answer(), "calibrator_version": None}, rules=drift)
    with pytest.raises(InvalidInput, match="no fit-time figures"):
        workflows.monitoring_report(window_answer(), calibrator_document={"version": 3}, rules=drift)
    with pytest.raises(InvalidInput, match="have no 'brier'"):
        workflows.monitoring_report(
            window_answer(), calibrator_document=DOCUMENT, rules=[workflows.parse_monitor_rule("brier+0.1")]
        )
    with pytest.raises(InvalidInput, match="calibrated figures only"):
        workflows.monitoring_report(
            window_answer(), rules=[workflows.parse_monitor_rule("uncalibrated.ece>0")]
        )


def test_an_empty_window_renders_in_every_format_with_unjudged_checks():
    answer = window_answer(0, state="too_few_outcomes")
    answer["figures"] = {key: (0 if key == "n" else value) for key, value in answer["figures"].items()}
    for key in workflows.MONITORING_FIGURES:
        answer["figures"][key] = None
    report = workflows.monitoring_report(answer, rules=[workflows.parse_monitor_rule("ece>0.1")])
    assert "reliability" not in report and report["calibrated"] == {"n": 0}
    assert report["thresholds"][0]["status"] == "unknown" and report["summary"]["status"] == "pass"
    for format in reports.FORMATS:
        assert reports.render(report, format)
    assert reports.UNKNOWN_MARK in reports.to_markdown(report)
