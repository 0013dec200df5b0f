"""deploy/prometheus/calibserve-rules.yml and deploy/grafana/calibserve-calibration.json against calibserve's series.

Structural checks (always run): the rules file and the dashboard parse, every alert carries what the on-call
needs (``for``, ``severity``, ``summary``, ``description``, ``runbook``), and every series that a rule
expression or a dashboard query selects is one calibserve exports: either a live-monitoring series of
:data:`MONITORING_SERIES` (the specification the exporter implements) or one that calibserve's modules register
with prometheus_client on import (derived from ``REGISTRY``, never listed here), with only the labels that
series has. A misspelled metric or label is otherwise silent: Prometheus evaluates it to an empty vector and
the alert never fires. Each check is also run on deliberately broken copies, which it must reject.

promtool checks (skipped without ``/usr/bin/promtool``, failures under ``CALIBSERVE_REQUIRE_ALL=1``):
``promtool check rules`` on the rules and ``promtool test rules`` on deploy/prometheus/calibserve-rules.test.yml,
which pins when each alert fires (CalibrationDrift after 15 minutes of drift == 1, not at 14; ConfidenceShift on
PSI 0.3, not 0.2; ...) and the exact text of its annotations.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.serving.telemetry import MONITORING_SERIES as GAUGES
from service.serving.telemetry import MonitoringCollector
from tests.helpers.data import REPO
from tests.helpers.requirements import require_or_skip

RULES = REPO / "deploy" / "prometheus" / "calibserve-rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "calibserve-rules.test.yml"
RULES_README = REPO / "deploy" / "prometheus" / "README.md"
DASHBOARD = REPO / "deploy" / "grafana" / "calibserve-calibration.json"

# The live-monitoring series, as specified for the exporter: name -> label names.
_MODEL_WINDOW = frozenset({"model", "window"})
MONITORING_SERIES: dict[str, frozenset[str]] = {
    **{f"calibserve_monitoring_{figure}": _MODEL_WINDOW for figure in GAUGES},
    "calibserve_monitoring_outcomes_total": frozenset({"model"}),
    "calibserve_prediction_log_rows_total": frozenset({"model"}),
}
WINDOWS = {"15m", "1h", "24h", "7d"}
EXPORTED_WINDOWS = {"1h", "24h"}  # the windows exported by default: a rule on another one never fires
# Series that Prometheus itself writes for every target, and the labels it attaches to every scraped series.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
TARGET_LABELS = frozenset({"job", "instance"})

RUNBOOK = "README.md#watching-calibration-in-production"
SEVERITIES = {"info", "warning", "critical"}
ALERT_KEYS = {"alert", "expr", "for", "labels", "annotations"}
RECORD_KEYS = {"record", "expr", "labels"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


# ------------------------------------------------------------------------------------ PromQL selectors


@dataclass(frozen=True)
class Selector:
    """One vector selector of a PromQL expression: its metric name and its label matchers."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...] = ()  # (label, operator, value)


_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
   |(?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
   |(?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])?)
   |(?P<name>[A-Za-z_][A-Za-z0-9_:]*|:[A-Za-z0-9_:]+)
   |(?P<operator>=~|!~|!=|==|>=|<=|[-+*/%^=<>,(){}\[\]@:])
   |(?P<space>\s+|\#[^\n]*)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position : position + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """The index just past the token that closes the ``opening`` at ``start``."""
    depth = 0
    for index in range(start, len(tokens)):
        if tokens[index] == ("operator", opening):
            depth += 1
        elif tokens[index] == ("operator", closing):
            depth -= 1
            if depth == 0:
                return index + 1
    raise ValueError(f"unbalanced {opening!r}")


def _matchers(tokens: list[tuple[str, str]], start: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
    end = _closing(tokens, start, "{", "}")
    inner = [token for token in tokens[start + 1 : end - 1] if token != ("operator", ",")]
    if len(inner) % 3:
        raise ValueError(f"unreadable label matchers: {inner}")
    found = []
    for (label_kind, label), (_, operator), (value_kind, value) in zip(
        inner[::3], inner[1::3], inner[2::3], strict=True
    ):
        if label_kind != "name" or value_kind != "string":
            raise ValueError(f"unreadable label matcher: {label} {operator} {value}")
        found.append((label, operator, value[1:-1] if value[0] == "`" else ast.literal_eval(value)))
    return tuple(found), end


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of ``expr`` (PromQL, Grafana variables allowed), in order.

    Names followed by ``(`` are functions, aggregation operators and keywords are skipped, grouping label lists
    (``by (...)``, ``on (...)``, ...) and range or subquery brackets are not selectors; what is left is a metric.
    """
    tokens = _tokens(expr)
    found: list[Selector] = []
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else None
        if (kind, text) == ("operator", "["):
            index = _closing(tokens, index, "[", "]")
        elif kind == "name" and text in _GROUPING:
            index = _closing(tokens, index + 1, "(", ")") if following == "(" else index + 1
        elif kind == "name" and (text in _KEYWORDS or text in _AGGREGATIONS or following == "("):
            index += 1
        elif kind == "name" or (kind, text) == ("operator", "{"):
            metric = text if kind == "name" else ""
            index += kind == "name"
            matchers: tuple[tuple[str, str, str], ...] = ()
            if index < len(tokens) and tokens[index] == ("operator", "{"):
                matchers, index = _matchers(tokens, index)
            if not metric:
                metric = next((v for label, op, v in matchers if label == "__name__" and op == "="), "")
            found.append(Selector(metric, matchers))
        else:
            index += 1
    return found


def variables(expr: str) -> set[str]:
    """The Grafana variables ``expr`` refers to (``$name``, ``${name}``, ``${name:format}``, ``[[name]]``)."""
    return {
        next(group for group in match.groups() if group)
        for match in re.finditer(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]", expr)
    }


def test_selectors_are_read_from_promql():
    assert selectors(
        'max by (model, window) (calibserve_monitoring_drift{window="1h"}) == 1 '
        'unless on (model, window) max by (model, window) (calibserve_monitoring_too_few_outcomes{window="1h"}) == 1'
    ) == [
        Selector("calibserve_monitoring_drift", (("window", "=", "1h"),)),
        Selector("calibserve_monitoring_too_few_outcomes", (("window", "=", "1h"),)),
    ]
    assert selectors(
        "histogram_quantile(0.99, sum by (le, route) (rate(calibserve_request_duration_seconds_bucket"
        '{route=~"/v2/models/{name}/infer", model=~"$model"}[$__rate_interval])))'
    ) == [
        Selector(
            "calibserve_request_duration_seconds_bucket",
            (("route", "=~", "/v2/models/{name}/infer"), ("model", "=~", "$model")),
        )
    ]
    assert selectors("sum(rate(a_total[5m] offset 1h)) / on() group_left(x) b or vector(0) > bool 1e3") == [
        Selector("a_total"),
        Selector("b"),
    ]
    assert selectors('max_over_time(x{y!~"a|b"}[1h:5m]) and {__name__="z"} unless up') == [
        Selector("x", (("y", "!~", "a|b"),)),
        Selector("z", (("__name__", "=", "z"),)),
        Selector("up"),
    ]
    assert variables('rate(x{model=~"$model", window="${window}"}[$__rate_interval]) [[old]]') == {
        "model",
        "window",
        "__rate_interval",
        "old",
    }


# ------------------------------------------------------------------------------------ what calibserve has


@functools.cache
def registered_series() -> dict[str, frozenset[str] | None]:
    """Every sample name of calibserve's own registered series -> its label names (``le`` for histogram
    buckets), from prometheus_client's REGISTRY after importing every module of the service. A custom collector
    (one that yields its families when scraped) declares no labels: None."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    importlib.import_module("service.serving.telemetry")
    importlib.import_module("service.api.observability")
    importlib.import_module("service.api.app")  # and whatever else the application wires in
    found: dict[str, frozenset[str] | None] = {}
    for collector, names in REGISTRY._collector_to_names.items():  # no public listing of collectors
        labels = frozenset(collector._labelnames) if isinstance(collector, MetricWrapperBase) else None
        for name in names:
            if name.startswith("calibserve_"):
                found[name] = (
                    None if labels is None else labels | ({"le"} if name.endswith("_bucket") else set())
                )
    assert "calibserve_requests_total" in found, "the request counter was not found in REGISTRY"
    return found


@functools.cache
def known_series() -> dict[str, frozenset[str] | None]:
    """Every series a rule or panel may select -> the labels it may match (with the target labels); None: any
    (a series of a custom collector that the specification does not list)."""
    series = {**MONITORING_SERIES, **PROMETHEUS_SERIES}
    for name, labels in registered_series().items():
        series[name] = labels if labels is not None else MONITORING_SERIES.get(name)
    return {name: None if labels is None else labels | TARGET_LABELS for name, labels in series.items()}


@functools.cache
def route_templates() -> frozenset[str]:
    """The route templates the request counter's ``route`` label takes: the application's own routes and
    those of every router in service.api.routers (with their prefixes)."""
    from service.api.app import create_app
    from service.config import Settings

    app = create_app(Settings(store_dir="unused", models_dir=None))  # builds routes only: nothing is read
    templates = {route.path for route in app.routes if isinstance(getattr(route, "path", None), str)}
    package = importlib.import_module("service.api.routers")
    for module_info in pkgutil.iter_modules(package.__path__):
        router = getattr(importlib.import_module(f"{package.__name__}.{module_info.name}"), "router", None)
        templates |= {route.path for route in getattr(router, "routes", [])}
    return frozenset(templates)


def selector_problems(where: str, expr: str, known: dict[str, frozenset[str] | None]) -> list[str]:
    """What is wrong with the selectors of ``expr``: unknown metrics, labels the metric does not have, windows
    that are not exported, routes that match no route template."""
    try:
        found = selectors(expr)
    except ValueError as error:
        return [f"{where}: {error}"]
    if not found:
        return [f"{where}: selects no series"]
    problems = []
    for selector in found:
        if selector.metric not in known:
            problems.append(f"{where}: unknown metric {selector.metric!r}")
            continue
        for label, operator, value in selector.matchers:
            if label == "__name__":
                continue
            if known[selector.metric] is not None and label not in known[selector.metric]:
                problems.append(f"{where}: {selector.metric} has no label {label!r}")
            elif "$" in value:
                continue  # a Grafana variable: checked by the dashboard's variables
            elif label == "window" and operator == "=" and value not in WINDOWS:
                problems.append(f"{where}: window {value!r} is none of {sorted(WINDOWS)}")
            elif label == "window" and operator == "=" and value not in EXPORTED_WINDOWS:
                problems.append(
                    f"{where}: window {value!r} is not exported by default ({sorted(EXPORTED_WINDOWS)})"
                )
            elif label == "route" and operator in ("=", "=~"):
                pattern = re.escape(value) if operator == "=" else value
                if not any(re.fullmatch(pattern, route) for route in route_templates()):
                    problems.append(f"{where}: route {operator}{value!r} matches no route of calibserve")
    return problems


# ------------------------------------------------------------------------------------ the rules file


def recorded_series(document: Any) -> dict[str, None]:
    """Series the rules file records itself: usable in its own expressions (labels unknown: any)."""
    return {
        rule["record"]: None
        for group in (document or {}).get("groups") or []
        for rule in group.get("rules") or []
        if isinstance(rule, dict) and "record" in rule
    }


def rule_problems(path: Path) -> list[str]:
    """Everything wrong with the rules file at ``path`` (empty when it holds)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        return [f"not YAML: {error}"]
    if not isinstance(document, dict) or not document.get("groups"):
        return ["no groups"]
    known = {**known_series(), **recorded_series(document)}
    problems: list[str] = []
    group_names: list[str] = []
    alert_names: list[str] = []
    for group in document["groups"]:
        group_names.append(group.get("name"))
        if not group.get("rules"):
            problems.append(f"group {group.get('name')!r}: no rules")
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record") or "<unnamed>"
            if "alert" in rule:
                alert_names.append(name)
                problems += [f"{name}: unknown key {key!r}" for key in sorted(set(rule) - ALERT_KEYS)]
                problems += [f"{name}: no {key!r}" for key in sorted(ALERT_KEYS - set(rule))]
                if "for" in rule and not DURATION.match(str(rule["for"])):
                    problems.append(f"{name}: 'for' is not a duration: {rule['for']!r}")
                severity = (rule.get("labels") or {}).get("severity")
                if severity not in SEVERITIES:
                    problems.append(
                        f"{name}: labels.severity is {severity!r}, not one of {sorted(SEVERITIES)}"
                    )
                annotations = rule.get("annotations") or {}
                for key in ("summary", "description", "runbook"):
                    if not str(annotations.get(key) or "").strip():
                        problems.append(f"{name}: no annotations.{key}")
                if annotations.get("runbook") and not str(annotations["runbook"]).endswith(RUNBOOK):
                    problems.append(f"{name}: annotations.runbook does not point at {RUNBOOK}")
                for key in ("summary", "description"):
                    if annotations.get(key) and "{{ $labels." not in annotations[key]:
                        problems.append(f"{name}: annotations.{key} names no label of the alert")
            elif "record" in rule:
                problems += [f"{name}: unknown key {key!r}" for key in sorted(set(rule) - RECORD_KEYS)]
                if ":" not in name:
                    problems.append(f"{name}: a recorded series is named level:metric:operations")
            else:
                problems.append(f"a rule is neither an alert nor a record: {sorted(rule)}")
            if rule.get("expr"):
                problems += selector_problems(name, str(rule["expr"]), known)
    for kind, names in (("group", group_names), ("alert", alert_names)):
        problems += [f"{kind} {n!r} is not unique" for n in sorted({n for n in names if names.count(n) > 1})]
    return problems


def alert_names(path: Path = RULES) -> list[str]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule["alert"] for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_the_rules_file_holds():
    assert rule_problems(RULES) == []


def test_the_rules_cover_what_calibserve_must_be_watched_for():
    assert set(alert_names()) >= {
        "CalibrationDrift",
        "CalibrationDriftSustained",
        "CalibrationNoOutcomes",
        "ConfidenceShift",
        "ExpectedAccuracyGap",
        "CalibserveDown",
        "CalibserveHighErrorRate",
    }
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    }
    drift, sustained = rules["CalibrationDrift"], rules["CalibrationDriftSustained"]
    assert (drift["for"], drift["labels"]["severity"]) == ("15m", "warning")
    assert (sustained["for"], sustained["labels"]["severity"]) == ("15m", "critical")
    assert Selector("calibserve_monitoring_drift", (("window", "=", "1h"),)) in selectors(drift["expr"])
    assert Selector("calibserve_monitoring_drift", (("window", "=", "24h"),)) in selectors(sustained["expr"])
    assert rules["ConfidenceShift"]["for"] == "30m" and "> 0.25" in rules["ConfidenceShift"]["expr"]


def test_every_alert_fires_in_the_promtool_tests_and_is_explained_in_the_readme():
    cases = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
    firing = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test") or []
        if check.get("exp_alerts")
    }
    readme = RULES_README.read_text(encoding="utf-8")
    for name in alert_names():
        assert name in firing, f"{name}: no case of {RULES_TEST.name} expects it to fire"
        assert f"`{name}`" in readme, f"{name}: not explained in {RULES_README.relative_to(REPO)}"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_runbook_section_exists_once_monitoring_is_exported():
    """The runbook annotation points at the README's section on monitoring, which comes with the exporter."""
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    anchor = RUNBOOK.split("#", 1)[1]
    if anchor not in anchors:
        if not any(name.startswith("calibserve_monitoring_") for name in registered_series()):
            pytest.skip("calibserve exports no calibserve_monitoring_* series yet, nor documents them")
        pytest.fail(f"README.md has no section #{anchor}, which every alert's runbook points at")


def test_the_monitoring_series_are_exported_as_the_rules_expect():
    """The gauges come from a collector read at scrape time (the monitoring database), the counters from
    prometheus_client's registry: each with exactly the labels the rules and the dashboard match."""
    fake = [(figure, "m", "1h", 0.5) for figure in GAUGES]
    families = {family.name: family for family in MonitoringCollector(lambda: fake).collect()}
    registered = registered_series()
    for name, labels in MONITORING_SERIES.items():
        if name in families:
            (sample,) = families[name].samples
            assert frozenset(sample.labels) == labels, (
                f"{name}: labels {sorted(sample.labels)}, not {sorted(labels)}"
            )
        else:
            assert name in registered, f"{name} is neither a monitoring gauge nor registered"
            assert registered[name] == labels, (
                f"{name}: labels {sorted(registered[name])}, not {sorted(labels)}"
            )


# Each: (what the copy changes: old text -> new text, what rule_problems must then say)
BROKEN_RULES = {
    "unknown metric": (
        'max by (model, window) (calibserve_monitoring_drift{window="1h"}) == 1',
        'max by (model, window) (calibserve_monitoring_drifted{window="1h"}) == 1',
        "CalibrationDrift: unknown metric 'calibserve_monitoring_drifted'",
    ),
    "unknown label": (
        'calibserve_monitoring_drift{window="24h"}',
        'calibserve_monitoring_drift{windows="24h"}',
        "CalibrationDriftSustained: calibserve_monitoring_drift has no label 'windows'",
    ),
    "no such window": (
        'calibserve_monitoring_drift{window="24h"}',
        'calibserve_monitoring_drift{window="1d"}',
        "CalibrationDriftSustained: window '1d' is none of",
    ),
    "window not exported": (
        'calibserve_monitoring_drift{window="24h"}',
        'calibserve_monitoring_drift{window="7d"}',
        "CalibrationDriftSustained: window '7d' is not exported by default",
    ),
    "status label of another metric": (
        'rate(calibserve_requests_total{status=~"5.."}[5m])',
        'rate(calibserve_request_duration_seconds_count{status=~"5.."}[5m])',
        "CalibserveHighErrorRate: calibserve_request_duration_seconds_count has no label 'status'",
    ),
    "missing annotation": (
        "runbook: README.md#watching-calibration-in-production\n\n      # 5xx",
        "\n      # 5xx",
        "CalibserveDown: no annotations.runbook",
    ),
    "empty description": (
        "description: >-\n            Prometheus has failed",
        'description: ""\n          unused: >-\n            Prometheus has failed',
        "CalibserveDown: no annotations.description",
    ),
    "missing for": ("        for: 5m\n", "", "CalibserveDown: no 'for'"),
    "missing severity": (
        'severity: critical\n        annotations:\n          summary: "calibserve target',
        'team: ml\n        annotations:\n          summary: "calibserve target',
        "CalibserveDown: labels.severity is None",
    ),
    "misspelled key": (
        "for: 30m\n        labels:\n          severity: warning\n        annotations:\n          "
        "summary: 'Confidence",
        "for: 30m\n        label:\n          severity: warning\n        annotations:\n          "
        "summary: 'Confidence",
        "ConfidenceShift: unknown key 'label'",
    ),
    "duplicate alert": (
        "alert: CalibrationDriftSustained",
        "alert: CalibrationDrift",
        "alert 'CalibrationDrift' is not unique",
    ),
    "runbook elsewhere": (
        "runbook: README.md#watching-calibration-in-production\n\n  - name",
        "runbook: README.md#guarantees\n\n  - name",
        "ExpectedAccuracyGap: annotations.runbook does not point at",
    ),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_RULES))
def test_a_broken_copy_of_the_rules_is_caught(broken, tmp_path):
    old, new, expected = BROKEN_RULES[broken]
    text = RULES.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"the rules file changed: {old!r} is not there once"
    copy = tmp_path / RULES.name
    copy.write_text(text.replace(old, new), encoding="utf-8")
    problems = rule_problems(copy)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_route_matchers_must_match_a_route_of_calibserve():
    known = known_series()
    proxy = (
        'rate(calibserve_requests_total{route=~"/v1/models/.+/(calibrate|predict)|/v2/models/.+/infer"}[5m])'
    )
    assert selector_problems("ok", proxy, known) == []
    assert selector_problems("ok", 'calibserve_requests_total{route="/v1/models/{name}/fit"}', known) == []
    assert selector_problems("typo", 'calibserve_requests_total{route="/v1/model/{name}/fit"}', known) == [
        "typo: route ='/v1/model/{name}/fit' matches no route of calibserve"
    ]
    assert selector_problems(
        "raw path", 'calibserve_requests_total{route=~"/v2/models/digits/.*"}', known
    ) == ["raw path: route =~'/v2/models/digits/.*' matches no route of calibserve"]


# ------------------------------------------------------------------------------------ the dashboard


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, the panels of collapsed rows included."""
    found = []
    for panel in panels:
        found.append(panel)
        found += all_panels(panel.get("panels") or [])
    return found


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query", "") if isinstance(query, dict) else query or "")


def dashboard_problems(path: Path) -> list[str]:
    """Everything wrong with the dashboard at ``path`` (empty when it holds)."""
    try:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        return [f"not JSON: {error}"]
    problems: list[str] = []
    uid = dashboard.get("uid")
    if not isinstance(uid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
        problems.append(f"dashboard uid {uid!r} is not 1 to 40 of [A-Za-z0-9_-]")
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        problems.append(f"schemaVersion {dashboard.get('schemaVersion')!r}: not 36 or later")
    known = known_series()

    template = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    defined = set(template) | GRAFANA_VARIABLES
    datasource = template.get("DS_PROMETHEUS") or {}
    if (datasource.get("type"), datasource.get("query")) != ("datasource", "prometheus"):
        problems.append("no datasource variable DS_PROMETHEUS of type prometheus")
    for name, wanted in (("model", "label_values(calibserve_monitoring_ece, model)"), ("window", None)):
        variable = template.get(name)
        if variable is None:
            problems.append(f"no template variable {name!r}")
            continue
        query = variable_query(variable)
        if wanted is not None and re.sub(r"\s", "", query) != re.sub(r"\s", "", wanted):
            problems.append(f"variable {name!r} queries {query!r}, not {wanted!r}")
    for name, variable in template.items():
        if variable.get("type") != "query":
            continue
        if variable.get("datasource") != DATASOURCE:
            problems.append(f"variable {name!r}: datasource is not {DATASOURCE}")
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", variable_query(variable))
        if match is None:
            problems.append(f"variable {name!r}: not a label_values(selector, label) query")
            continue
        series, label = match.groups()
        problems += selector_problems(f"variable {name!r}", series, known)
        problems += [
            f"variable {name!r}: {s.metric} has no label {label!r}"
            for s in selectors(series)
            if known.get(s.metric) is not None and label not in known[s.metric]
        ]

    panels = all_panels(dashboard.get("panels") or [])
    if not panels:
        problems.append("no panels")
    ids = [panel.get("id") for panel in panels]
    problems += [
        f"panel id {i!r} is not unique" for i in sorted({i for i in ids if ids.count(i) > 1}, key=str)
    ]
    problems += [
        f"panel {panel.get('title')!r} has no id" for panel in panels if not isinstance(panel.get("id"), int)
    ]
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        title = panel.get("title") or f"panel {panel.get('id')}"
        grid = panel.get("gridPos") or {}
        x, y, w, h = (grid.get(key) for key in "xywh")
        if not all(isinstance(v, int) for v in (x, y, w, h)) or x < 0 or w < 1 or h < 1 or x + w > 24:
            problems.append(f"{title!r}: gridPos {grid} is not inside the 24 columns")
        else:
            for cell in ((column, row) for column in range(x, x + w) for row in range(y, y + h)):
                if cell in cells:
                    problems.append(f"{title!r} overlaps {cells[cell]!r}")
                    break
                cells[cell] = title
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{title!r}: datasource is not {DATASOURCE}")
        targets = [t for t in panel.get("targets") or [] if str(t.get("expr") or "").strip()]
        if not targets:
            problems.append(f"{title!r}: no target with an expr")
        refs = [t.get("refId") for t in panel.get("targets") or []]
        if len(set(refs)) != len(refs):
            problems.append(f"{title!r}: refIds {refs} are not unique")
        for target in targets:
            where = f"{title!r} {target.get('refId')}"
            if target.get("datasource", DATASOURCE) != DATASOURCE:
                problems.append(f"{where}: datasource is not {DATASOURCE}")
            problems += selector_problems(where, target["expr"], known)
            problems += [
                f"{where}: undefined variable ${n}" for n in sorted(variables(target["expr"]) - defined)
            ]
    return problems


def test_the_dashboard_holds():
    assert dashboard_problems(DASHBOARD) == []


def test_the_dashboard_shows_every_monitoring_figure_and_the_proxy_routes():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    shown = {
        s.metric
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets") or []
        for s in selectors(target["expr"])
    }
    figures = {name for name in MONITORING_SERIES if not name.endswith("_total")}
    assert figures <= shown, sorted(figures - shown)
    assert {"calibserve_requests_total", "calibserve_request_duration_seconds_bucket"} <= shown
    states = [
        panel for panel in all_panels(dashboard["panels"]) if panel["type"] in ("state-timeline", "stat")
    ]
    assert any("calibserve_monitoring_drift" in t["expr"] for panel in states for t in panel["targets"])


def _broken_dashboard(change) -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    change(dashboard)
    return dashboard


def _panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    (found,) = [panel for panel in all_panels(dashboard["panels"]) if panel.get("title") == title]
    return found


BROKEN_DASHBOARDS = {
    "unknown metric": (
        lambda d: _panel(d, "ECE per model")["targets"][0].update(
            expr='max by (model) (calibserve_monitoring_ece_ratio{model=~"$model", window="$window"})'
        ),
        "'ECE per model' A: unknown metric 'calibserve_monitoring_ece_ratio'",
    ),
    "unknown label": (
        lambda d: _panel(d, "Negative log-likelihood")["targets"][0].update(
            expr='max by (model) (calibserve_monitoring_nll{models=~"$model", window="$window"})'
        ),
        "'Negative log-likelihood' A: calibserve_monitoring_nll has no label 'models'",
    ),
    "no target": (
        lambda d: _panel(d, "Brier score").update(targets=[]),
        "'Brier score': no target with an expr",
    ),
    "empty expr": (
        lambda d: _panel(d, "Confidence shift: KS")["targets"][0].update(expr=" "),
        "'Confidence shift: KS': no target with an expr",
    ),
    "undefined variable": (
        lambda d: _panel(d, "MCE per model")["targets"][0].update(
            expr='max by (model) (calibserve_monitoring_mce{model=~"$models", window="$window"})'
        ),
        "'MCE per model' A: undefined variable $models",
    ),
    "duplicate panel id": (
        lambda d: _panel(d, "Brier score").update(id=_panel(d, "ECE per model")["id"]),
        "panel id",
    ),
    "overlapping panels": (
        lambda d: _panel(d, "Brier score").update(gridPos=dict(_panel(d, "ECE per model")["gridPos"])),
        "'Brier score' overlaps 'ECE per model'",
    ),
    "fixed datasource": (
        lambda d: _panel(d, "Brier score").update(datasource={"type": "prometheus", "uid": "abc123"}),
        "'Brier score': datasource is not",
    ),
    "no window variable": (
        lambda d: d["templating"].update(list=[v for v in d["templating"]["list"] if v["name"] != "window"]),
        "no template variable 'window'",
    ),
    "model variable on another series": (
        lambda d: next(v for v in d["templating"]["list"] if v["name"] == "model").update(
            query="label_values(calibserve_fits_total, model)"
        ),
        "variable 'model' queries",
    ),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_DASHBOARDS))
def test_a_broken_copy_of_the_dashboard_is_caught(broken, tmp_path):
    change, expected = BROKEN_DASHBOARDS[broken]
    copy = tmp_path / DASHBOARD.name
    copy.write_text(json.dumps(_broken_dashboard(change)), encoding="utf-8")
    problems = dashboard_problems(copy)
    assert any(problem.startswith(expected) for problem in problems), problems


# ------------------------------------------------------------------------------------ promtool


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        require_or_skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def run_promtool(*arguments: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, arguments)], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules():
    result = run_promtool("check", "rules", RULES, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = run_promtool("test", "rules", RULES_TEST, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _copies(tmp_path: Path, old: str, new: str) -> Path:
    """Copies of the rules and their unit tests in ``tmp_path``, the rules with ``old`` replaced by ``new``."""
    text = RULES.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"the rules file changed: {old!r} is not there once"
    (tmp_path / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return tmp_path


def test_promtool_unit_tests_pin_the_drift_delay(tmp_path):
    """CalibrationDrift with `for: 5m` instead of 15m fires at minute 24 of the unit test, which expects none."""
    promtool()
    old = 'calibserve_monitoring_too_few_outcomes{window="1h"}) == 1\n        for: 15m'
    copies = _copies(tmp_path, old, old.replace("15m", "5m"))
    result = run_promtool("test", "rules", RULES_TEST.name, cwd=copies)
    assert result.returncode != 0
    assert "alertname: CalibrationDrift, time: 24m" in result.stdout + result.stderr


def test_promtool_unit_tests_pin_the_psi_threshold(tmp_path):
    """ConfidenceShift on PSI > 0.1 fires for the moderate 0.2 of the unit test, which expects only 0.3."""
    promtool()
    copies = _copies(
        tmp_path,
        "(calibserve_monitoring_confidence_psi) > 0.25",
        "(calibserve_monitoring_confidence_psi) > 0.1",
    )
    result = run_promtool("test", "rules", RULES_TEST.name, cwd=copies)
    assert result.returncode != 0
    assert "alertname: ConfidenceShift, time: 30m" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_expression(tmp_path):
    promtool()
    copies = _copies(tmp_path, 'up{job="calibserve"} == 0', 'up{job="calibserve"} == ')
    result = run_promtool("check", "rules", RULES.name, cwd=copies)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert '"CalibserveDown": could not parse expression' in output, output


# What Grafana puts in place of its variables before the query reaches Prometheus (one value each).
GRAFANA_VALUES = {
    "model": "digits",
    "window": "1h",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


def test_promtool_parses_the_dashboard_queries(tmp_path):
    """Each panel query, its variables replaced as Grafana would, is valid PromQL: checked as recording rules."""
    promtool()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets") or []:
            expr = re.sub(
                r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)",
                lambda m: GRAFANA_VALUES[m.group(1) or m.group(2)],
                target["expr"],
            )
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
    copy = tmp_path / "dashboard-queries.yml"
    copy.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = run_promtool("check", "rules", copy, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
