"""Figures that tests measure (throughput, memory, counts): printed in a "reliability figures" section at
the end of the run by tests/reliability/conftest.py, and written as JSON to ``$CALIBSERVE_FIGURES`` if set."""

from __future__ import annotations

from typing import Any

FIGURES: dict[str, dict[str, Any]] = {}


def record_figures(test: str, **figures: Any) -> None:
    FIGURES.setdefault(test, {}).update(figures)
