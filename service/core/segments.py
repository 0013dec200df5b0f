"""Segments of a labelled set: one key per row (a customer, a site, a device), validated and indexed.

Calibration can hold on average and fail for one segment; a report per segment (multicalibration as a
report) needs the rows of each segment. Keys are strings or integers (never booleans, floats or null), at
most :data:`MAX_SEGMENTS` distinct ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import InvalidInput

__all__ = ["DEFAULT_MIN_SEGMENT_SIZE", "MAX_SEGMENTS", "check_segments"]

MAX_SEGMENTS = 1000
"""Most distinct segments of one evaluation: each costs a full report (and its bootstrap)."""
DEFAULT_MIN_SEGMENT_SIZE = 100
"""Rows a segment needs to be gated (``worst.*`` thresholds) and to get bootstrap intervals: below it a
segment is reported, but its figures are too noisy to fail a build on (at 100 rows an ECE's sampling
spread is some 0.03-0.05)."""


def check_segments(segments: Any, n_samples: int) -> tuple[np.ndarray, list[str]]:
    """``(codes, names)``: each row's segment index into ``names`` (the keys as strings, in order of first
    appearance), from a sequence of ``n_samples`` strings or integers. InvalidInput naming the first bad
    row otherwise."""
    values = list(segments.tolist() if isinstance(segments, np.ndarray) else segments)
    if len(values) != n_samples:
        raise InvalidInput(
            f"segments has {len(values)} entries for {n_samples} rows: give one segment per row",
            field="segments",
        )
    codes = np.empty(n_samples, dtype=np.intp)
    index: dict[str, int] = {}
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidInput(
                f"segments[{row}] is {value!r}; a segment is a string or an integer", field="segments"
            )
        name = str(value)
        if name not in index:
            if len(index) == MAX_SEGMENTS:
                raise InvalidInput(
                    f"segments holds more than {MAX_SEGMENTS} distinct values; each is a full report",
                    field="segments",
                )
            index[name] = len(index)
        codes[row] = index[name]
    return codes, list(index)
