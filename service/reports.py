"""Render an evaluation report (the dict made by :func:`service.workflows.evaluate`) for people and CI systems.

Formats: JSON (the machine-readable report itself, schema in ``docs/report-schema.md``), JUnit XML (one
testcase per threshold, so CI systems show breaches natively), Markdown (a table for a CI step summary or a
pull-request comment) and a self-contained HTML page (tables plus the reliability diagram as an embedded PNG).

All renderers are pure functions of the report: the same report gives the same bytes, apart from the HTML
figure, which matplotlib draws.
"""

from __future__ import annotations

import base64
import html
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from service.core.calibration_tests import CALIBRATION_TEST_FIGURES
from service.errors import InvalidInput

FORMATS = ("json", "junit", "markdown", "html")
SUFFIX_FORMATS = {
    ".json": "json",
    ".xml": "junit",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
}
HEADLINE_FIGURES = ("ece", "mce", "brier", "nll", "accuracy")
GROUPS = ("uncalibrated", "calibrated")
JUNIT_CLASSNAME = "calibserve.calibration"
PASS_MARK = "✅"
FAIL_MARK = "❌"
UNKNOWN_MARK = "⚪"  # a check that was not judged (a monitoring window with too few outcomes)


# ------------------------------------------------------------------------------------------------ helpers


def format_for_path(path: str | Path) -> str:
    """The report format a file name asks for by its extension (``.json``, ``.xml``, ``.md``, ``.html``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(SUFFIX_FORMATS)
        raise InvalidInput(
            f"{path}: cannot tell the report format from {suffix or 'no extension'!r} (use {known} or --format)",
            field="out",
        )
    return SUFFIX_FORMATS[suffix]


def figure_names(report: Mapping[str, Any]) -> list[str]:
    """Numeric figures of the report: the headline ones first, then the variants alphabetically, then the
    statistical tests of calibration, each statistic followed by its p-value (or standard error)."""
    names: set[str] = set()
    for group in GROUPS:
        for name, value in (report.get(group) or {}).items():
            if name != "n" and isinstance(value, int | float) and not isinstance(value, bool):
                names.add(name)
    head = [name for name in HEADLINE_FIGURES if name in names]
    tail = [name for name in CALIBRATION_TEST_FIGURES if name in names]
    return head + sorted(names - set(head) - set(tail)) + tail


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}g}"


def _signed(value: float | None) -> str:
    if value is None:
        return "–"
    return ("+" if value > 0 else "") + _number(value)


def _interval(report: Mapping[str, Any], group: str, name: str) -> str:
    bounds = ((report.get("intervals") or {}).get(group) or {}).get(name)
    if not bounds:
        return ""
    return f" [{_number(bounds[0])}, {_number(bounds[1])}]"


def _figure_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    uncalibrated = report.get("uncalibrated") or {}
    calibrated = report.get("calibrated") or {}
    rows = []
    for name in figure_names(report):
        before, after = uncalibrated.get(name), calibrated.get(name)
        change = (
            after - before if isinstance(before, int | float) and isinstance(after, int | float) else None
        )
        rows.append(
            (
                name,
                _number(before) + _interval(report, "uncalibrated", name) if name in uncalibrated else "–",
                _number(after) + _interval(report, "calibrated", name) if name in calibrated else "–",
                _signed(change),
            )
        )
    return rows


def check_message(check: Mapping[str, Any]) -> str:
    """One line saying what a check compared: ``ece = 0.041 > 0.03`` when breached, the rule when it holds."""
    metric, value, limit = check.get("metric", "?"), check.get("value"), check.get("limit")
    if check.get("status") == "unknown":
        reason = check.get("detail") or "a figure is missing"
        return f"{check.get('name', metric)}: {reason}"
    if check.get("kind") == "outcomes":
        if check.get("status") == "fail":
            return f"{_number(value)} outcomes in the window, fewer than the {_number(limit)} required"
        return f"{_number(value)} outcomes in the window (at least {_number(limit)} required)"
    if check.get("kind") == "drift":  # a monitoring drift rule: the change against the fit-time figure
        change, baseline = check.get("change"), check.get("baseline")
        rises = check.get("op") != "fall>"
        moved = change if rises else (-change if isinstance(change, int | float) else None)
        verb = "rose by" if moved is None or moved >= 0 else "fell by"
        return (
            f"{metric} {verb} {_number(abs(moved) if moved is not None else None)} ({_number(value)} against "
            f"fit-time {_number(baseline)}); allowed {'rise' if rises else 'fall'} {_number(limit)}"
        )
    if check.get("kind") == "max_increase":
        baseline = check.get("baseline")
        delta = (
            value - baseline if isinstance(value, int | float) and isinstance(baseline, int | float) else None
        )
        verb = "rose by" if delta is None or delta >= 0 else "fell by"
        allowed = "fall" if metric == "accuracy" else "rise"
        return (
            f"{metric} {verb} {_number(abs(delta) if delta is not None else None)} ({_number(value)} against "
            f"baseline {_number(baseline)}); allowed {allowed} {_number(limit)}"
        )
    comparison = f"{check.get('op', '?')} {_number(limit, 6)}"
    subject = f"{metric}.{check['bound']}" if check.get("bound") else metric
    subject = f"worst.{subject}" if check.get("worst") else subject
    context = ""
    if check.get("worst"):  # the worst gated segment: which one, and how large
        context = f" (segment {check.get('segment')!r}, n = {check.get('segment_n')})"
    elif check.get("bound"):  # a bound of a bootstrap interval: say which interval, around which estimate
        context = f" ({check.get('interval') or 'bootstrap'} interval of {metric} = {_number(check.get('estimate'), 6)})"
    elif check.get("test"):  # a p-value: the test and its statistic
        context = f" ({check['test']}: {check.get('statistic')} = {_number(check.get('statistic_value'), 6)})"
    if check.get("status") == "fail":
        return f"{subject} = {_number(value, 6)} {comparison}{context}"
    return f"{subject} = {_number(value, 6)}{context} (fails if {comparison})"


def _check_details(check: Mapping[str, Any]) -> str:
    keys = (
        "name",
        "kind",
        "group",
        "metric",
        "op",
        "limit",
        "value",
        "baseline",
        "change",
        "worst",
        "segment",
        "segment_n",
        "min_segment_size",
        "bound",
        "interval",
        "estimate",
        "test",
        "statistic",
        "statistic_value",
        "status",
        "detail",
    )
    return "\n".join(f"{key}: {check[key]}" for key in keys if key in check)


def _figures_text(report: Mapping[str, Any]) -> str:
    lines = ["figure\tuncalibrated\tcalibrated\tchange"]
    lines += ["\t".join(row) for row in _figure_rows(report)]
    return "\n".join(lines)


_BRIEF_CONVENTIONS = ("kind", "binning", "n_bins", "norm", "nll", "bootstrap")


def _conventions_text(report: Mapping[str, Any], *, brief: bool = False) -> str:
    """``key=value`` pairs of the report's conventions; ``brief`` keeps those a reader of a table needs."""
    conventions = report.get("conventions") or {}
    keys = [k for k in _BRIEF_CONVENTIONS if k in conventions] if brief else list(conventions)
    return ", ".join(f"{key}={_plain(conventions[key])}" for key in keys)


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={_plain(v)}" for k, v in value.items()) + "}"
    return str(value)


def _calibrator_text(report: Mapping[str, Any]) -> str:
    calibrator = report.get("calibrator")
    if not calibrator:
        return "none (uncalibrated softmax only)"
    parts = [str(calibrator.get("method") or "unknown method")]
    if calibrator.get("temperature") is not None:
        parts.append(f"T = {_number(calibrator['temperature'])}")
    if calibrator.get("model"):
        parts.append(f"model {calibrator['model']}")
    if calibrator.get("version") is not None:
        parts.append(f"version {calibrator['version']}")
    return ", ".join(parts)


def _summary(report: Mapping[str, Any]) -> Mapping[str, Any]:
    checks = report.get("thresholds") or []
    failed = sum(check.get("status") == "fail" for check in checks)
    fallback = {"checks": len(checks), "passed": len(checks) - failed, "failed": failed}
    fallback["status"] = "fail" if failed else "pass"
    return report.get("summary") or fallback


def _mark(check: Mapping[str, Any]) -> str:
    status = check.get("status")
    return FAIL_MARK if status == "fail" else UNKNOWN_MARK if status == "unknown" else PASS_MARK


def _monitoring_properties(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What a monitoring report (``calibserve monitor``) adds to the JUnit properties: the window, its
    outcomes, the server's drift state and the label-free figures."""
    monitoring = report.get("monitoring")
    if not isinstance(monitoring, Mapping):
        return []
    drift = monitoring.get("drift") or {}
    properties: list[tuple[str, Any]] = [
        ("window", monitoring.get("window")),
        ("outcomes", monitoring.get("outcomes")),
        ("min_outcomes", monitoring.get("min_outcomes")),
        ("calibrator_version", monitoring.get("calibrator_version")),
        ("drift_state", drift.get("state")),
    ]
    properties += [(f"label_free.{k}", v) for k, v in (monitoring.get("label_free") or {}).items()]
    return properties


def _monitoring_text(report: Mapping[str, Any]) -> str:
    """One sentence on a monitoring window: its outcomes, the server's drift state, the label-free figures."""
    monitoring = report.get("monitoring") or {}
    drift = monitoring.get("drift") or {}
    label_free = monitoring.get("label_free") or {}
    judged = "" if monitoring.get("judged", True) else ", too few to judge"
    return (
        f"Monitoring window {monitoring.get('window')}: {_number(monitoring.get('outcomes'))} outcomes"
        f"{judged} (judged from {_number(monitoring.get('min_outcomes'))}); server drift state "
        f"{drift.get('state', '?')}. Label-free: {_number(label_free.get('predictions'))} predictions, "
        f"expected accuracy {_number(label_free.get('expected_accuracy'))}, realised "
        f"{_number(label_free.get('realised_accuracy'))}, confidence PSI "
        f"{_number(label_free.get('confidence_psi'))}, KS {_number(label_free.get('confidence_ks'))}."
    )


# --------------------------------------------------------------------------------------------------- JSON


def to_json(report: Mapping[str, Any]) -> bytes:
    """The report as indented JSON (orjson; numpy scalars and arrays allowed; NaN becomes ``null``)."""
    return orjson.dumps(
        report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    )


def load_json(path: str | Path) -> dict:
    """Read a JSON object from a file (a report or a calibrator document); errors name the file."""
    try:
        document = orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{path}: not valid JSON ({exc})", field="path") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{path}: expected a JSON object", field="path")
    return document


# -------------------------------------------------------------------------------------------------- JUnit


def to_junit(report: Mapping[str, Any]) -> bytes:
    """JUnit XML: one ``<testcase>`` per threshold, a ``<failure type="threshold">`` with the numbers if breached.

    Without thresholds there is a single passing testcase ``evaluation`` whose ``<system-out>`` holds the
    figures, so that a CI system still shows the run. Structure (the attributes JUnit consumers require)::

        <testsuites name tests failures errors time>
          <testsuite name="calibserve" tests failures errors skipped time timestamp>
            <properties><property name value/>...</properties>
            <testcase classname="calibserve.calibration" name="ece>0.03" time="0">
              <failure message="ece = 0.041 > 0.03" type="threshold">details</failure>
            </testcase>
          </testsuite>
        </testsuites>
    """
    checks = list(report.get("thresholds") or [])
    failures = sum(check.get("status") == "fail" for check in checks)
    skipped = sum(check.get("status") == "unknown" for check in checks)
    tests = max(len(checks), 1)
    counts = {"tests": str(tests), "failures": str(failures), "errors": "0", "time": "0"}
    root = ET.Element("testsuites", {"name": "calibserve", **counts})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": "calibserve",
            **counts,
            "skipped": str(skipped),
            "timestamp": str(report.get("created_at", "")),
        },
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("n", report.get("n")),
        ("num_classes", report.get("num_classes")),
        ("calibrator", _calibrator_text(report)),
        ("conventions", _conventions_text(report)),
        *_monitoring_properties(report),
    ):
        ET.SubElement(properties, "property", {"name": name, "value": str(value)})
    if not checks:
        case = ET.SubElement(
            suite, "testcase", {"classname": JUNIT_CLASSNAME, "name": "evaluation", "time": "0"}
        )
        ET.SubElement(case, "system-out").text = _figures_text(report)
    for check in checks:
        case = ET.SubElement(
            suite, "testcase", {"classname": JUNIT_CLASSNAME, "name": str(check.get("name")), "time": "0"}
        )
        if check.get("status") == "fail":
            failure = ET.SubElement(case, "failure", {"message": check_message(check), "type": "threshold"})
            failure.text = _check_details(check)
        elif check.get("status") == "unknown":
            ET.SubElement(case, "skipped", {"message": check_message(check)})
        else:
            ET.SubElement(case, "system-out").text = check_message(check)
    ET.SubElement(suite, "system-out").text = _figures_text(report)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


# ----------------------------------------------------------------------------------------------- Markdown


def _markdown_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Mapping[str, Any]) -> str:
    """A GitHub-flavoured Markdown summary: the figures table, then the thresholds table with ✅ / ❌."""
    summary = _summary(report)
    status = summary.get("status", "pass")
    mark = FAIL_MARK if status == "fail" else PASS_MARK
    lines = [
        f"### calibserve calibration report {mark} {status}",
        "",
        f"{report.get('n', '?')} samples, {report.get('num_classes', '?')} classes; "
        f"calibrator: {_markdown_cell(_calibrator_text(report))}.",
        "",
        f"Conventions: {_markdown_cell(_conventions_text(report, brief=True)) or 'defaults'} "
        "(all of them in the JSON report).",
        "",
        *([_markdown_cell(_monitoring_text(report)), ""] if report.get("monitoring") else []),
        "| figure | uncalibrated | calibrated | change |",
        "|---|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in _figure_rows(report)]
    if report.get("segments"):
        segments = report["segments"]
        lines += [
            "",
            f"{segments.get('n_segments')} segments, {segments.get('gated')} of at least "
            f"{segments.get('min_segment_size')} rows (gated); worst first:",
            "",
            "| segment | rows | gated | ECE uncalibrated | ECE calibrated |",
            "|---|---:|---|---:|---:|",
        ]
        lines += [
            "| " + " | ".join(_markdown_cell(cell) for cell in row) + " |"
            for row in _segment_rows(report)[:20]
        ]
    lines += _conformal_markdown(report)
    checks = report.get("thresholds") or []
    lines.append("")
    if checks:
        not_judged = f", {summary['unknown']} not judged" if summary.get("unknown") else ""
        lines += [
            f"{summary.get('checks', len(checks))} checks, {summary.get('passed', 0)} passed, "
            f"{summary.get('failed', 0)} failed{not_judged}.",
            "",
            "| | check | group | value | limit | detail |",
            "|---|---|---|---:|---:|---|",
        ]
        for check in checks:
            cells = (
                _mark(check),
                f"`{check.get('name')}`",
                check.get("group", ""),
                _number(check.get("value"), 6),
                _number(check.get("limit"), 6),
                check_message(check),
            )
            lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    else:
        lines.append("No thresholds were set.")
    return "\n".join(lines) + "\n"


def _conformal_rows(report: Mapping[str, Any]) -> tuple[str, list[list[str]]]:
    """The conformal section's sentence and its table (set size, rows, coverage), or ``("", [])``."""
    sets = report.get("conformal")
    if not sets:
        return "", []
    per_class = [value for value in sets.get("coverage_per_class") or [] if value is not None]
    sentence = (
        f"Conformal prediction sets ({sets.get('score')}{', mondrian' if sets.get('mondrian') else ''}"
        f"{', randomised' if sets.get('randomized') else ''}) at alpha {_number(sets.get('alpha'))}: coverage "
        f"{_number(sets.get('coverage'))} (target {_number(sets.get('target'))}), per class "
        f"{_number(min(per_class)) if per_class else '-'} to {_number(max(per_class)) if per_class else '-'}; "
        f"mean set size {_number(sets.get('mean_set_size'), 3)}, empty sets {_number(sets.get('empty_sets'))}."
    )
    rows = [
        [str(item["size"]), str(item["n"]), _number(item["coverage"])]
        for item in sets.get("size_stratified_coverage") or []
    ]
    return sentence, rows


def _conformal_markdown(report: Mapping[str, Any]) -> list[str]:
    sentence, rows = _conformal_rows(report)
    if not sentence:
        return []
    lines = ["", _markdown_cell(sentence), "", "| set size | rows | coverage |", "|---:|---:|---:|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _conformal_html(report: Mapping[str, Any]) -> str:
    sentence, rows = _conformal_rows(report)
    if not sentence:
        return ""
    table = _html_table(["set size", "rows", "coverage"], rows, {0, 1, 2}, [""] * len(rows))
    return f"<h2>Prediction sets</h2>\n<p>{html.escape(sentence)}</p>\n{table}\n"


# --------------------------------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td { background: #fde8e8; }
.pass { color: #176f2c; } .fail { color: #b3261e; }
img { max-width: 100%; height: auto; }
"""


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int], row_classes: list[str]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = []
    for row, row_class in zip(rows, row_classes, strict=True):
        cells = "".join(
            f'<td class="num">{html.escape(cell)}</td>' if i in numeric else f"<td>{html.escape(cell)}</td>"
            for i, cell in enumerate(row)
        )
        body.append(f'<tr class="{html.escape(row_class)}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def to_html(report: Mapping[str, Any], *, figure_png: bytes | None = None) -> str:
    """A self-contained HTML page: summary, figures table, thresholds table and the reliability diagram.

    The diagram is drawn with :func:`service.plots.reliability_diagram` unless ``figure_png`` is given, and
    embedded as a base64 ``data:`` URI, so the page needs no other file. Every text is HTML-escaped.
    """
    if figure_png is None and report.get("reliability"):
        from service.plots import reliability_diagram

        figure_png = reliability_diagram(report, format="png")
    summary = _summary(report)
    status = str(summary.get("status", "pass"))
    figure_table = _html_table(
        ["figure", "uncalibrated", "calibrated", "change"],
        [list(row) for row in _figure_rows(report)],
        {1, 2, 3},
        [""] * len(_figure_rows(report)),
    )
    checks = report.get("thresholds") or []
    if checks:
        check_table = _html_table(
            ["status", "check", "group", "value", "limit", "detail"],
            [
                [
                    f"{_mark(c)} {c.get('status')}",
                    str(c.get("name")),
                    str(c.get("group", "")),
                    _number(c.get("value"), 6),
                    _number(c.get("limit"), 6),
                    check_message(c),
                ]
                for c in checks
            ],
            {3, 4},
            [str(c.get("status", "")) for c in checks],
        )
    else:
        check_table = "<p>No thresholds were set.</p>"
    image = (
        f'<img alt="reliability diagram" src="data:image/png;base64,{base64.b64encode(figure_png).decode()}">'
        if figure_png
        else ""
    )
    escape = html.escape
    monitoring = f"<p>{escape(_monitoring_text(report))}</p>\n" if report.get("monitoring") else ""
    segments = _segments_html(report) + _conformal_html(report)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>calibserve calibration report: {escape(status)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>calibserve calibration report <span class="{escape(status)}">{escape(status)}</span></h1>
<p>{escape(str(report.get("n", "?")))} samples, {escape(str(report.get("num_classes", "?")))} classes;
calibrator: {escape(_calibrator_text(report))}; created {escape(str(report.get("created_at", "")))}.</p>
<p>Conventions: {escape(_conventions_text(report) or "defaults")}.</p>
{monitoring}<h2>Figures</h2>
{figure_table}
<h2>Thresholds</h2>
{check_table}
<h2>Reliability diagram</h2>
{image}
{segments}</body>
</html>
"""


def _segment_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per segment, worst first: key, rows, gated, ECE before and after."""
    from service.plots import segment_order

    by_segment = (report.get("segments") or {}).get("by_segment") or {}
    rows = []
    for name in segment_order(report):
        entry = by_segment[name]
        rows.append(
            [
                str(name),
                str(entry.get("n")),
                "yes" if entry.get("gated") else "no",
                _number((entry.get("uncalibrated") or {}).get("ece")),
                _number((entry.get("calibrated") or {}).get("ece")) if "calibrated" in entry else "–",
            ]
        )
    return rows


def _segments_html(report: Mapping[str, Any]) -> str:
    """The segments section: a table, worst first, and one small reliability diagram per segment."""
    segments = report.get("segments")
    if not segments:
        return ""
    from service.plots import segment_diagrams

    rows = _segment_rows(report)
    table = _html_table(
        ["segment", "rows", "gated", "ECE uncalibrated", "ECE calibrated"], rows, {1, 3, 4}, [""] * len(rows)
    )
    try:
        image = segment_diagrams(report)
        picture = (
            f'<img alt="reliability diagram per segment" '
            f'src="data:image/png;base64,{base64.b64encode(image).decode()}">'
        )
    except InvalidInput:
        picture = ""
    floor = html.escape(str(segments.get("min_segment_size")))
    return (
        f"<h2>Segments</h2>\n<p>{segments.get('n_segments')} segments, {segments.get('gated')} of at least "
        f"{floor} rows (gated).</p>\n{table}\n{picture}\n"
    )


# ------------------------------------------------------------------------------------------------ dispatch


def render(report: Mapping[str, Any], format: str, *, figure_png: bytes | None = None) -> bytes:
    """The report in ``format`` (one of ``json``, ``junit``, ``markdown``, ``html``) as bytes.

    ``figure_png`` is the reliability diagram for the HTML page when the caller has drawn it already.
    """
    if format == "json":
        return to_json(report)
    if format == "junit":
        return to_junit(report)
    if format == "markdown":
        return to_markdown(report).encode("utf-8")
    if format == "html":
        return to_html(report, figure_png=figure_png).encode("utf-8")
    raise InvalidInput(f"unknown report format {format!r}; use one of {', '.join(FORMATS)}", field="format")
