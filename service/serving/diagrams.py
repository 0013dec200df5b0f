"""Reliability diagrams of evaluation reports, as the HTTP API serves them (the console's before/after figure).

The figure is the CLI's own (:func:`service.plots.reliability_diagram`, the file ``calibserve evaluate --plot
x.svg`` writes), so the console and the CLI cannot draw the same report differently. ``plots.py`` imports
matplotlib, which costs a worker about 0.3 s and 30 MB: it is imported on the first diagram, never by a worker
that serves none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SVG_TYPE = "image/svg+xml"


def reliability_svg(report: Mapping[str, Any], title: str | None = None) -> bytes:
    """The reliability diagram (before and, with a calibrator, after calibration) of an evaluation report
    (:func:`service.workflows.evaluate`), or of the bins a calibrator version stores of its fit data
    (:func:`service.workflows.stored_reliability`, the same shape), as an SVG document; ``title`` says what
    the bins are of."""
    from service.plots import reliability_diagram

    return reliability_diagram(report, format="svg", title=title)
