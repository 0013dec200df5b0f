"""What a fit document costs beyond the fit: ``workflows.fit_document`` against ``TemperatureScaling.fit``.

``fit_document`` is what the CLI's ``fit``, ``POST /v1/models/{name}/fit`` and refits run: validation, the
fit, and the document with its fit-time figures (``before``: of the logits; ``after``: of the calibrated
probabilities; ece, mce, brier, nll, accuracy, overconfidence, underconfidence, a fused pass over the
logits per group) and the data's SHA-256 (the hash and ``before`` run in a second thread during the fit).
The target of issue
#10: on 1M x 10 logits, ``fit_document`` within 1.5x the fit alone.

Data: float32 logits ``3 N(0, 1)`` with labels sampled from their softmax (seed 0), so the model is three
times too sharp. The two competitors run interleaved (A B, A B, ...) and are compared by medians taken in
the same run; see ``bench/_timing.py``. ``--write`` replaces the ``bench_fit_document`` section of
``bench/README.md`` (or of ``--readme``).

Usage: ``.venv/bin/python bench/bench_fit_document.py [--write] [--sizes 1000000x10 50000x1000 ...]
[--budget S] [--threads N] [--profile NxK]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _timing import (
    Competitor,
    Samples,
    format_ratio,
    format_seconds,
    interleaved,
    machine_info,
    markdown_table,
    ratio,
    replace_section,
)
from threadpoolctl import threadpool_info, threadpool_limits

from service import workflows
from service.core.calibrators import TemperatureScaling

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "bench" / "README.md"
SECTION = "bench_fit_document"
DEFAULT_SIZES = ("1000000x10", "50000x1000")
TARGET_SIZE, TARGET_RATIO = (1_000_000, 10), 1.5
SEED = 0


@dataclass
class Case:
    n_samples: int
    n_classes: int
    logits: np.ndarray
    labels: np.ndarray

    @property
    def label(self) -> str:
        return f"{self.n_samples:,} x {self.n_classes}"


def parse_size(text: str) -> tuple[int, int]:
    rows, sep, columns = text.lower().partition("x")
    if not sep or not rows.isdigit() or not columns.isdigit() or int(rows) < 2 or int(columns) < 2:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 1000000x10")
    return int(rows), int(columns)


def make_case(n_samples: int, n_classes: int, *, seed: int = SEED) -> Case:
    """Over-confident logits ``3 N(0, 1)`` (float32) and labels drawn from ``softmax(N(0, 1))``."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_samples, n_classes))
    probabilities = np.exp(base - base.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    labels = (probabilities.cumsum(axis=1) < rng.random((n_samples, 1))).sum(axis=1)
    labels = np.minimum(labels, n_classes - 1)
    return Case(n_samples, n_classes, (3.0 * base).astype(np.float32), labels.astype(np.int64))


@dataclass
class Comparison:
    case: Case
    samples: dict[str, Samples]

    @property
    def ratio(self) -> float:
        """fit_document's median over the fit's (how many fits a document costs)."""
        return ratio(self.samples["fit_document"], self.samples["fit"])


def compare(case: Case, *, budget_s: float, min_repeats: int = 3, max_repeats: int = 7) -> Comparison:
    competitors = [
        Competitor(
            "fit", lambda: TemperatureScaling().fit(case.logits, case.labels), min_repeats, max_repeats
        ),
        Competitor(
            "fit_document", lambda: workflows.fit_document(case.logits, case.labels), min_repeats, max_repeats
        ),
    ]
    samples = interleaved(competitors, budget_s=budget_s)
    fitted = samples["fit"].result.temperature_
    documented = samples["fit_document"].result["temperature"]
    if fitted != documented:  # the same fit, or the comparison means nothing
        raise AssertionError(f"fit gave T={fitted!r}, fit_document T={documented!r}")
    return Comparison(case, samples)


def _cell(samples: Samples) -> str:
    return f"{format_seconds(samples.median)} ({len(samples)})"


def table(results: list[Comparison]) -> str:
    rows = []
    for result in results:
        fit, document = result.samples["fit"], result.samples["fit_document"]
        overhead = document.median - fit.median
        target = ""
        if (result.case.n_samples, result.case.n_classes) == TARGET_SIZE:
            target = "met" if result.ratio <= TARGET_RATIO else "**missed**"
        rows.append(
            [
                result.case.label,
                _cell(fit),
                _cell(document),
                format_seconds(max(overhead, 0.0)),
                format_ratio(result.ratio),
                target,
            ]
        )
    headers = ["logits", "fit", "fit_document", "document - fit", "document / fit", f"<= {TARGET_RATIO}x"]
    return markdown_table(headers, rows)


def render(results: list[Comparison], info: dict[str, str], command: str, total_s: float) -> str:
    machine = ", ".join(f"{key} {value}" for key, value in info.items())
    return "\n".join(
        [
            "## Fit document cost (`bench/bench_fit_document.py`)",
            "",
            f"Command: `{command}` (wall time {total_s:.0f} s). Machine: {machine}.",
            "",
            "fit: `TemperatureScaling().fit(logits, labels)`. fit_document: `workflows.fit_document(logits, "
            "labels)`, what the CLI's `fit` and the HTTP fit run: one validation, the same fit, the fit-time "
            "figures before and after calibration (the headline figures and over/underconfidence, a fused "
            "pass over the logits per group) and the data's SHA-256; the hash and the 'before' figures run "
            "in a second thread during the fit, the 'after' figures after it. Data: float32 logits "
            "`3 N(0, 1)`, labels drawn from `softmax(N(0, 1))` (seed 0). Medians of the number of runs in "
            "brackets, run interleaved; a first run shorter than a quarter of the time budget is a discarded "
            "warm-up. The figures are numpy work, the fit is torch's: the ratio depends on torch's thread "
            "count (see `torch threads`) and on whether the second thread finds an idle core (the load "
            "average: on a saturated machine the thread only competes with the fit).",
            "",
            table(results),
        ]
    )


def profile(case: Case) -> str:
    """cProfile of fit_document on ``case`` (top 30 by internal time)."""
    workflows.fit_document(case.logits, case.labels)
    profiler = cProfile.Profile()
    profiler.runcall(workflows.fit_document, case.logits, case.labels)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    return out.getvalue()


def _command() -> str:
    python = sys.executable
    try:
        relative = os.path.relpath(python)
        if not relative.startswith(".."):
            python = relative
    except ValueError:
        pass
    return " ".join([python, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the {SECTION} section of the README")
    parser.add_argument("--readme", type=Path, default=README, help="the README --write updates")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in DEFAULT_SIZES])
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of samples per competitor")
    parser.add_argument("--profile", type=parse_size, metavar="NxK", help="profile fit_document and exit")
    parser.add_argument(
        "--threads", type=int, help="limit torch, BLAS and OpenMP to N threads each (default: the libraries')"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)
    if args.profile:
        print(profile(make_case(*args.profile)))
        return 0

    started = time.perf_counter()
    info = machine_info({"torch threads": str(torch.get_num_threads()), "numpy": np.__version__})
    if args.threads is not None:
        info["torch threads"] += " (--threads)"
        info["thread pools"] = ", ".join(
            f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info()
        )
    small = make_case(1_000, 5)  # imports, allocator and caches, before anything is timed
    workflows.fit_document(small.logits, small.labels)
    results = []
    for size in args.sizes:
        case = make_case(*size)
        print(f"{case.label} ...", file=sys.stderr, flush=True)
        results.append(compare(case, budget_s=args.budget))
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    text = render(results, info, _command(), time.perf_counter() - started)
    print(text)
    if args.write:
        replace_section(args.readme, SECTION, text)
        print(f"\nwrote the {SECTION} section of {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
