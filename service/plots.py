"""Reliability diagrams of an evaluation report (matplotlib, Agg backend, imported only when drawing)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.errors import InvalidInput

FIGURE_SIZE_IN = (6.0, 7.0)
DPI = 100
PIXEL_SIZE = (600, 700)  # FIGURE_SIZE_IN * DPI: the PNG's width and height
FORMATS = ("png", "svg")
_STYLE = {
    "uncalibrated": {"color": "#d1495b", "marker": "o", "label": "before calibration"},
    "calibrated": {"color": "#00798c", "marker": "s", "label": "after calibration"},
}


def _points(bins: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """(mean confidence, accuracy) of the non-empty bins."""
    pairs = [
        (confidence, accuracy)
        for confidence, accuracy in zip(bins["mean_confidence"], bins["accuracy"], strict=True)
        if confidence is not None and accuracy is not None
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def reliability_diagram(
    report: Mapping[str, Any],
    *,
    path: str | Path | None = None,
    format: str | None = None,
    title: str | None = None,
) -> bytes:
    """Draw the reliability diagram of ``report`` and return the image (also written to ``path`` if given).

    The figure is 6 x 7 inches at 100 dpi, so a PNG is exactly 600 x 700 pixels (an SVG is 432 x 504 pt).
    The upper axes plot, for each non-empty bin, the accuracy against the mean confidence before and (when
    the report has a calibrator) after calibration, with the diagonal of perfect calibration; each curve's
    legend entry gives its ECE. The lower axes, sharing the confidence axis, show the number of samples in
    each bin as a step histogram, so that sparsely populated bins are not over-read.

    Parameters
    ----------
    report : dict
        An evaluation report (:func:`service.workflows.evaluate`): its ``reliability`` bins per group, and
        the ``ece`` under ``uncalibrated`` / ``calibrated``.
    path : str or Path, optional
        Output file; its extension (``.png`` or ``.svg``) picks the format unless ``format`` is given.
    format : {"png", "svg"}, optional
        Image format; default from ``path``, else PNG.
    title : str, optional
        What the bins are of (e.g. a version's fit data), put before the title's ``n`` and binning.

    Returns
    -------
    bytes
        The encoded image.
    """
    format = _image_format(path, format)
    reliability, groups = _groups(report, "reliability", "reliability bins")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, nothing to close

    smooth = report.get("reliability_smooth") or {}
    smooth_groups = [group for group in groups if smooth.get(group)]
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, layout="constrained")
    columns = 2 if smooth_groups else 1
    axes = figure.subplots(2, columns, sharex=True, squeeze=False, gridspec_kw={"height_ratios": (3, 1)})
    upper, lower = axes[0][0], axes[1][0]
    if smooth_groups:
        _smooth_diagram(report, smooth, smooth_groups, axes[0][1], axes[1][1])
    upper.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="perfect calibration")
    for group in groups:
        bins = reliability[group]
        style = _STYLE[group]
        ece = (report.get(group) or {}).get("ece", bins.get("ece"))
        confidence, accuracy = _points(bins)
        upper.plot(
            confidence,
            accuracy,
            marker=style["marker"],
            markersize=4,
            color=style["color"],
            label=f"{style['label']} (ECE = {ece:.4f})" if ece is not None else style["label"],
        )
        lower.stairs(bins["counts"], bins["edges"], color=style["color"], label=style["label"], linewidth=1.5)
    first = reliability[groups[0]]
    conventions = report.get("conventions") or {}
    binning = (
        "equal-mass" if (conventions.get("binning") or first.get("binning")) == "mass" else "equal-width"
    )
    n_bins = conventions.get("n_bins") or first.get("n_bins") or len(first["counts"])
    upper.set(
        xlim=(0, 1),
        ylim=(0, 1),
        ylabel="accuracy",
        title=f"{title or 'Reliability diagram'} (n = {report.get('n', sum(first['counts']))}, "
        f"{n_bins} {binning} bins)",
    )
    upper.set_aspect("auto")
    upper.grid(True, alpha=0.3)
    upper.legend(loc="upper left", fontsize="small")
    lower.set(xlabel="confidence (top-label probability)", ylabel="samples per bin")
    lower.grid(True, alpha=0.3)

    if smooth_groups:
        upper.set_title(f"binned: n = {report.get('n', sum(first['counts']))}, {n_bins} {binning} bins")
    buffer = io.BytesIO()
    # SVG text stays text (searchable, small); fixed ids and no date so the same report gives the same file
    metadata = {"Date": None} if format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "calibserve"}):
        figure.savefig(buffer, format=format, dpi=DPI, metadata=metadata)
    image = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(image)
    return image


def _smooth_diagram(
    report: Mapping[str, Any], smooth: Mapping[str, Any], groups: list[str], upper: Any, lower: Any
) -> None:
    """The smoothed reliability diagram (smECE's kernel estimate) beside the binned one: the curve of the
    accuracy at each confidence, and below it the confidences' smoothed density."""
    upper.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1)
    for group in groups:
        curve = smooth[group]
        style = _STYLE[group]
        value = (report.get(group) or {}).get("ece_smooth", curve.get("ece_smooth"))
        upper.plot(
            curve["mesh"],
            curve["accuracy"],
            color=style["color"],
            linewidth=1.5,
            label=f"smECE = {value:.4f} (sigma {curve['sigma']:.3g})"
            if value is not None
            else style["label"],
        )
        lower.plot(curve["mesh"], curve["density"], color=style["color"], linewidth=1.5)
    upper.set(xlim=(0, 1), ylim=(0, 1), title="smoothed (smECE kernel)")
    upper.grid(True, alpha=0.3)
    upper.legend(loc="upper left", fontsize="x-small")
    lower.set(xlabel="confidence", ylabel="density")
    lower.grid(True, alpha=0.3)


MAX_SEGMENT_PANELS = 24
"""Most segments drawn as small multiples (the worst first, by calibrated ECE where there is one)."""


def segment_order(report: Mapping[str, Any]) -> list[str]:
    """Segment keys, worst first: gated segments by descending ECE (calibrated where present), then the
    segments under the size floor, by size."""
    by_segment = (report.get("segments") or {}).get("by_segment") or {}
    group = "calibrated" if report.get("calibrated") else "uncalibrated"

    def key(name: str) -> tuple:
        entry = by_segment[name]
        ece = (entry.get(group) or {}).get("ece")
        return (not entry.get("gated"), -(ece if isinstance(ece, int | float) else -1.0), -entry.get("n", 0))

    return sorted(by_segment, key=key)


def segment_diagrams(report: Mapping[str, Any], *, format: str = "png") -> bytes:
    """Small multiples: one reliability diagram per segment (at most :data:`MAX_SEGMENT_PANELS`, worst
    first), before and after calibration, each titled with its key, size and ECE; segments under the size
    floor are marked "not gated"."""
    by_segment = (report.get("segments") or {}).get("by_segment") or {}
    names = [name for name in segment_order(report) if by_segment[name].get("reliability")]
    names = names[:MAX_SEGMENT_PANELS]
    if not names:
        raise InvalidInput("the report has no segment reliability bins to draw", field="segments")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(2.4 * columns, 2.4 * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for index, axis in enumerate(axes.flat):
        if index >= len(names):
            axis.set_visible(False)
            continue
        name = names[index]
        entry = by_segment[name]
        axis.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=0.8)
        title_ece = ""
        for group in ("uncalibrated", "calibrated"):
            bins = entry["reliability"].get(group)
            if not bins:
                continue
            confidence, accuracy = _points(bins)
            style = _STYLE[group]
            axis.plot(confidence, accuracy, marker=style["marker"], markersize=2.5, color=style["color"])
            ece = (entry.get(group) or {}).get("ece")
            if isinstance(ece, int | float):
                title_ece = f", ECE {ece:.3f}"
        gated = "" if entry.get("gated") else " (not gated)"
        axis.set_title(f"{str(name)[:24]} n={entry.get('n')}{title_ece}{gated}", fontsize="x-small")
        axis.set(xlim=(0, 1), ylim=(0, 1))
        axis.tick_params(labelsize="xx-small")
        axis.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    metadata = {"Date": None} if format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "calibserve"}):
        figure.savefig(buffer, format=format, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


MAX_LABEL_PANELS = 48
"""Most labels drawn by :func:`label_diagrams` (the first ones, in label order)."""


def label_diagrams(
    report: Mapping[str, Any], *, path: str | Path | None = None, format: str | None = None
) -> bytes:
    """Small multiples of a multi-label report (:func:`service.multilabel_workflows.evaluate`): one
    reliability diagram per label (at most :data:`MAX_LABEL_PANELS`), the observed frequency of the label
    against the mean predicted probability of each non-empty bin, before and after calibration, each panel
    titled with the label, its prevalence and its ECE (after calibration when there is one)."""
    format = _image_format(path, format)
    reliability, groups = _groups(report, "reliability_per_label", "per-label reliability bins")
    n_labels = min(len(reliability[groups[0]]), MAX_LABEL_PANELS)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    columns = min(4, n_labels)
    rows = -(-n_labels // columns)
    figure = Figure(figsize=(2.4 * columns, 2.4 * rows + 0.4), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for index, axis in enumerate(axes.flat):
        if index >= n_labels:
            axis.set_visible(False)
            continue
        axis.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=0.8)
        title_ece = ""
        for group in groups:
            bins = reliability[group][index]
            style = _STYLE[group]
            axis.plot(
                bins["mean_probability"],
                bins["frequency"],
                marker=style["marker"],
                markersize=2.5,
                color=style["color"],
                label=style["label"],
            )
            ece = (report[group]["per_label"][index] or {}).get("ece")
            if isinstance(ece, int | float):
                title_ece = f", ECE {ece:.3f}"
        row = report[groups[0]]["per_label"][index]
        name = row.get("name", f"label {index}")
        axis.set_title(f"{str(name)[:20]} (p={row.get('prevalence', 0):.2f}){title_ece}", fontsize="x-small")
        axis.set(xlim=(0, 1), ylim=(0, 1))
        axis.tick_params(labelsize="xx-small")
        axis.grid(True, alpha=0.3)
    axes.flat[0].legend(loc="upper left", fontsize="xx-small")
    figure.suptitle(
        f"Per-label reliability (n = {report.get('n')}, x: predicted probability, y: observed frequency)",
        fontsize="small",
    )
    buffer = io.BytesIO()
    metadata = {"Date": None} if format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "calibserve"}):
        figure.savefig(buffer, format=format, dpi=DPI, metadata=metadata)
    image = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(image)
    return image


def _image_format(path: Any, format: str | None) -> str:
    """``format``, else the file name's suffix (png without a name); InvalidInput for another."""
    if format is None:
        format = Path(path).suffix.lower().lstrip(".") if path is not None else "png"
    if format not in FORMATS:
        raise InvalidInput(f"reliability diagrams are written as .png or .svg, not {format!r}", field="plot")
    return format


def _groups(report: Mapping[str, Any], key: str, what: str) -> tuple[Mapping[str, Any], list[str]]:
    """The report's bins under ``key`` and which of uncalibrated / calibrated it holds; InvalidInput for none."""
    reliability = report.get(key) or {}
    groups = [group for group in ("uncalibrated", "calibrated") if reliability.get(group)]
    if not groups:
        raise InvalidInput(f"the report has no {what} to draw", field="reliability")
    return reliability, groups
