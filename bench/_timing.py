"""Small timing helpers shared by the benchmarks in ``bench/``.

The machines these run on are small and shared (2 cores, other jobs running), so one run of a competitor
says little. :func:`interleaved` runs the competitors in rounds (A B C, A B C, ...) so that a burst of
outside load hits all of them alike, repeats each as often as its own duration allows, and keeps every
sample; results are compared by medians taken in the same run (:func:`ratio`).

Nothing here imports the project: a bench script owns its competitors and its data.
"""

from __future__ import annotations

import datetime as _datetime
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Competitor",
    "Samples",
    "format_ratio",
    "format_seconds",
    "interleaved",
    "machine_info",
    "markdown_table",
    "ratio",
    "replace_section",
    "time_call",
]


def time_call(function: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, timed with :func:`time.perf_counter`, the cyclic GC paused.

    As :mod:`timeit` does: a collection triggered by earlier garbage would otherwise land in whichever
    competitor happens to allocate next. (A full ``gc.collect()`` before every call would cost more than
    the fast competitors themselves once torch and scikit-learn are loaded.)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        result = function()
        return time.perf_counter() - start, result
    finally:
        if enabled:
            gc.enable()


@dataclass
class Competitor:
    """One contender: a zero-argument callable and how often it may be repeated.

    ``min_repeats`` / ``max_repeats`` bound the number of timed samples; in between, the competitor is
    repeated while its samples fit in the round's ``budget_s`` (so slow ones run fewer times).
    """

    name: str
    function: Callable[[], Any]
    min_repeats: int = 3
    max_repeats: int = 5


@dataclass
class Samples:
    """Timed samples of one competitor, and the result of its last call."""

    name: str
    seconds: list[float] = field(default_factory=list)
    result: Any = None
    warmup_s: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """``(min, max)`` of the samples."""
        return min(self.seconds), max(self.seconds)

    def __len__(self) -> int:
        return len(self.seconds)


def interleaved(
    competitors: Sequence[Competitor], *, budget_s: float = 10.0, discard_below_s: float | None = None
) -> dict[str, Samples]:
    """Time every competitor in interleaved rounds; return their samples by name.

    Round 0 runs each competitor once at this size. A run shorter than ``discard_below_s`` (default
    ``budget_s / 4``) is a warm-up and is discarded: page faults, allocator growth and caches weigh on it.
    A longer one is kept as the first sample, since those one-off costs are then below the run-to-run noise
    and repeating a slow competitor only for a warm-up would blow the time budget. The first timing fixes
    each competitor's target count, ``clamp(budget_s // t_first, min_repeats, max_repeats)``, and the
    rounds go on, each running every competitor that still needs samples, until all have their count.
    """
    if discard_below_s is None:
        discard_below_s = budget_s / 4
    gc.collect()
    samples = {c.name: Samples(c.name) for c in competitors}
    targets: dict[str, int] = {}
    for competitor in competitors:
        seconds, result = time_call(competitor.function)
        record = samples[competitor.name]
        record.result = result
        if seconds < discard_below_s:
            record.warmup_s = seconds
        else:
            record.seconds.append(seconds)
        wanted = int(budget_s // seconds) if seconds > 0 else competitor.max_repeats
        targets[competitor.name] = max(competitor.min_repeats, min(competitor.max_repeats, wanted))
    while True:
        pending = [c for c in competitors if len(samples[c.name]) < targets[c.name]]
        if not pending:
            return samples
        for competitor in pending:
            seconds, result = time_call(competitor.function)
            samples[competitor.name].seconds.append(seconds)
            samples[competitor.name].result = result


def ratio(other: Samples, ours: Samples) -> float:
    """How many times faster ours is than ``other``: ``median(other) / median(ours)``."""
    return other.median / ours.median


def format_seconds(seconds: float) -> str:
    """``12.3 s``, ``456 ms``, ``7.89 ms``, ``12.3 us``: three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def format_ratio(value: float) -> str:
    return f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info(extra_versions: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the timings depend on: CPU count, load, Python and library versions, date (UTC)."""
    info = {
        "date": _datetime.datetime.now(_datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    info.update(extra_versions or {})
    return info


def replace_section(path: Path, name: str, body: str, *, intro: str = "") -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``path`` with ``body``.

    Other sections of the file are left alone, so that several benches can share one README. A file or a
    section that does not exist yet is created (the file starts with ``intro``; the section is appended).
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else intro.rstrip() + "\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
