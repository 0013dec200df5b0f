"""Benchmark of the numerical core against what a user would otherwise pick (issue #2, "Proof").

In one run, on the same data:

- Temperature fit: time and reached NLL of :class:`service.core.calibrators.TemperatureScaling` against
  (a) the widely copied torch recipe (``nn.Parameter(torch.ones(1) * 1.5)``, ``LBFGS(lr=0.01,
  max_iter=50)``, one ``step`` of a closure computing ``CrossEntropyLoss(logits / t, labels)``), and
  (b) scikit-learn's temperature scaling, timed two ways: ``_TemperatureScaling().fit(logits, y)``, the
  calibrator that ``CalibratedClassifierCV(method="temperature")`` fits (its whole numerical work), and the
  public ``CalibratedClassifierCV(FrozenEstimator(clf), method="temperature", cv=[(all, all)])`` where
  ``clf.decision_function`` returns the logits (one pass, no cross-validation refits: the "prefit" use).
  Each reached NLL is measured by one float64 evaluator against (c) a float64 reference optimum from
  ``scipy.optimize.minimize_scalar(method="bounded")`` on ``log T``.
- ECE (15 equal-width bins, top-label, L1): :func:`service.core.metrics.expected_calibration_error` against
  torchmetrics' functional ``multiclass_calibration_error`` and a plain loop over the bins with boolean
  masks (numpy, as in many repositories), on the same float32 probabilities; the values must agree.

Competitors run interleaved (A B C, A B C, ...) and are compared by their medians in the same run; see
``bench/_timing.py``. ``--write`` replaces the ``bench_core`` section of ``bench/README.md``.

Usage: ``.venv/bin/python bench/bench_core.py [--write] [--sizes 10k_x_10 1M_x_10 ...] [--budget S]
[--profile SIZE] [--threads N]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import math
import os
import pstats
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import sklearn
import torch
import torchmetrics
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
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV, _TemperatureScaling
from sklearn.frozen import FrozenEstimator
from threadpoolctl import threadpool_info, threadpool_limits
from torch import nn, optim
from torchmetrics.functional.classification import multiclass_calibration_error

from service.core.calibrators import TemperatureScaling
from service.core.metrics import expected_calibration_error

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "bench" / "README.md"
REAL_DATA = ROOT / "tests" / "data" / "netcal_densenet-bc-100_c100.npz"
SECTION = "bench_core"
README_INTRO = """# Benchmarks

Scripts that time calibserve against the implementations a user would otherwise pick, on the same data in
one run, and the latest results. Each script owns one section of this file, between its
`<!-- name:start -->` / `<!-- name:end -->` markers, and rewrites only that section (with `--write`).
The machines are small and shared: competitors run interleaved and are compared by medians taken in the
same run; compare ratios, not absolute times, across runs.
"""

N_BINS = 15
SEED = 0
# Synthetic sizes (n_samples, n_classes) of issue #2.
SIZES: dict[str, tuple[int, int]] = {
    "10k_x_10": (10_000, 10),
    "50k_x_100": (50_000, 100),
    "50k_x_1000": (50_000, 1_000),
    "1M_x_10": (1_000_000, 10),
}
# The targets of issue #2: (size, minimum speed-up) for the fit against scikit-learn and ECE against
# torchmetrics; the fit must also reach the float64 optimum NLL to within NLL_TOLERANCE.
FIT_TARGETS = {"1M_x_10": 10.0, "50k_x_1000": 10.0}
ECE_TARGETS = {"1M_x_10": 2.0, "50k_x_1000": 5.0}
NLL_TOLERANCE = 1e-9
# Elements per block of the float64 NLL evaluator: bounds its memory (50k x 1000 in float64 is 400 MB).
_NLL_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Case:
    """Labelled float32 logits and their float32 softmax probabilities."""

    name: str
    logits: np.ndarray
    labels: np.ndarray
    description: str = ""
    probabilities: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.probabilities = torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()

    @property
    def shape_label(self) -> str:
        n, k = self.logits.shape
        shape = f"{n:,} x {k:,}"
        return shape if self.description == "synthetic" else f"{shape} ({self.description})"


def make_case(n_samples: int, n_classes: int, *, seed: int = SEED, name: str | None = None) -> Case:
    """Over-confident synthetic logits, float32: uniform labels, ``logits = 3 (onehot(y) + N(0, 1))``.

    With ``u = onehot(y) + N(0, I)``, Bayes' rule gives ``P(y = k | u) = softmax(u)_k`` exactly, so these
    logits are three times too sharp: the optimal temperature tends to 3 as ``n`` grows. That is far from
    the LBFGS recipe's start at 1.5, as a real over-confident network's optimum often is.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    logits = rng.standard_normal((n_samples, n_classes), dtype=np.float32)
    logits[np.arange(n_samples), labels] += np.float32(1.0)
    logits *= np.float32(3.0)
    return Case(name or f"{n_samples}_x_{n_classes}", logits, labels, "synthetic")


def real_case() -> Case | None:
    """DenseNet-BC-100 on CIFAR-100, validation half (5,000 x 100), if the fixture is present."""
    if not REAL_DATA.exists():
        return None
    with np.load(REAL_DATA) as data:
        logits = np.ascontiguousarray(data["logits_val"], dtype=np.float32)
        labels = data["labels_val"].astype(np.int64)
    return Case("densenet_c100", logits, labels, "real: DenseNet-BC-100, CIFAR-100 val")


# ------------------------------------------------------------------------------------ NLL reference


def exact_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / T)`` in float64 (logsumexp per block of rows), the common yardstick."""
    n_samples, n_classes = logits.shape
    rows_per_block = max(1, _NLL_BLOCK_ELEMENTS // n_classes)
    beta = 1.0 / temperature
    total = 0.0
    for start in range(0, n_samples, rows_per_block):
        block = torch.from_numpy(logits[start : start + rows_per_block]).to(torch.float64) * beta
        targets = torch.from_numpy(labels[start : start + rows_per_block])
        true_logit = block.gather(1, targets[:, None])[:, 0]
        total += float((torch.logsumexp(block, dim=1) - true_logit).sum())
    return total / n_samples


@dataclass(frozen=True)
class Reference:
    temperature: float
    nll: float
    evaluations: int


def reference_fit(logits: np.ndarray, labels: np.ndarray) -> Reference:
    """The float64 optimum: bounded Brent on ``log T`` over ``[log 0.01, log 100]``, ``xatol = 1e-10``."""
    found = minimize_scalar(
        lambda log_t: exact_nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(0.01), math.log(100.0)),
        method="bounded",
        options={"xatol": 1e-10, "maxiter": 500},
    )
    if not found.success:
        raise RuntimeError(f"reference fit did not converge: {found.message}")
    return Reference(math.exp(float(found.x)), float(found.fun), int(found.nfev))


# ------------------------------------------------------------------------------ fit competitors


def fit_ours(logits: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
    return TemperatureScaling().fit(logits, labels)


def fit_sklearn_core(logits: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's calibrator itself: what ``CalibratedClassifierCV(method="temperature")`` fits."""
    return 1.0 / float(_TemperatureScaling().fit(logits, labels).beta_)


class LogitsPassthrough(ClassifierMixin, BaseEstimator):
    """A fitted "classifier" whose decision function is its input: precomputed logits for scikit-learn."""

    def fit(self, X: Any, y: Any) -> LogitsPassthrough:
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X: Any) -> Any:
        return X

    def predict(self, X: Any) -> Any:  # scikit-learn's checks want one; the calibration never calls it
        return self.classes_[np.asarray(X).argmax(axis=1)]


def fit_sklearn_public(logits: np.ndarray, labels: np.ndarray) -> float:
    """``CalibratedClassifierCV`` on frozen logits, one split holding every row (the prefit use)."""
    frozen = FrozenEstimator(LogitsPassthrough().fit(None, np.arange(logits.shape[1])))
    every_row = np.arange(logits.shape[0])
    calibrated = CalibratedClassifierCV(frozen, method="temperature", cv=[(every_row, every_row)])
    calibrated.fit(logits, labels)
    return 1.0 / float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)


def fit_torch_lbfgs(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The widely copied recipe (e.g. gpleiss/temperature_scaling): LBFGS, lr=0.01, max_iter=50, one step."""
    temperature = nn.Parameter(torch.ones(1) * 1.5)
    optimizer = optim.LBFGS([temperature], lr=0.01, max_iter=50)
    criterion = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = criterion(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(temperature.item())


# ------------------------------------------------------------------------------ ECE competitors


def ece_ours(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return expected_calibration_error(probabilities, labels, n_bins=N_BINS)


def ece_torchmetrics(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    n_classes = probabilities.shape[1]
    return float(multiclass_calibration_error(probabilities, labels, n_classes, n_bins=N_BINS, norm="l1"))


def ece_bin_loop(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """The ECE as many repositories write it: a Python loop over the bins with boolean masks."""
    confidences = probabilities.max(axis=1)
    predictions = probabilities.argmax(axis=1)
    accuracies = predictions == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lower, upper in itertools.pairwise(edges):
        in_bin = (confidences > lower) & (confidences <= upper)
        share = in_bin.mean()
        if share > 0:
            ece += abs(float(confidences[in_bin].mean()) - float(accuracies[in_bin].mean())) * share
    return float(ece)


# ------------------------------------------------------------------------------------- comparisons


@dataclass
class FitOutcome:
    """One competitor's fit: timings, fitted T and the float64 NLL it reaches."""

    samples: Samples
    temperature: float
    nll: float

    def gap(self, reference: Reference) -> float:
        return abs(self.nll - reference.nll)


@dataclass
class FitComparison:
    case: Case
    reference: Reference
    outcomes: dict[str, FitOutcome]
    convergence: dict[str, Any]  # ours, as reported by TemperatureScaling.convergence_


@dataclass
class EceComparison:
    case: Case
    samples: dict[str, Samples]

    @property
    def values(self) -> dict[str, float]:
        return {name: float(s.result) for name, s in self.samples.items()}


FIT_NAMES = {
    "ours": "ours (TemperatureScaling)",
    "sklearn_core": "scikit-learn _TemperatureScaling",
    "sklearn_public": "scikit-learn CalibratedClassifierCV",
    "lbfgs": "torch LBFGS recipe",
}
ECE_NAMES = {"ours": "ours", "torchmetrics": "torchmetrics", "bin_loop": "bin loop (numpy)"}


def _repeats(quick: bool, minimum: int, maximum: int) -> dict[str, int]:
    return {"min_repeats": 1, "max_repeats": 1} if quick else {"min_repeats": minimum, "max_repeats": maximum}


def compare_fit(case: Case, *, budget_s: float = 10.0, quick: bool = False) -> FitComparison:
    """Time the four temperature fits, interleaved, and measure the NLL each reaches."""
    logits, labels = case.logits, case.labels
    logits_t, labels_t = torch.from_numpy(logits), torch.from_numpy(labels)
    competitors = [
        Competitor("ours", lambda: fit_ours(logits, labels), **_repeats(quick, 5, 5)),
        Competitor("sklearn_core", lambda: fit_sklearn_core(logits, labels), **_repeats(quick, 3, 5)),
        Competitor("sklearn_public", lambda: fit_sklearn_public(logits, labels), **_repeats(quick, 1, 5)),
        Competitor("lbfgs", lambda: fit_torch_lbfgs(logits_t, labels_t), **_repeats(quick, 1, 5)),
    ]
    samples = interleaved(competitors, budget_s=budget_s)
    reference = reference_fit(logits, labels)
    outcomes = {}
    for name, timed in samples.items():
        result = timed.result
        temperature = float(result.temperature_ if isinstance(result, TemperatureScaling) else result)
        outcomes[name] = FitOutcome(timed, temperature, exact_nll(logits, labels, temperature))
    return FitComparison(case, reference, outcomes, dict(samples["ours"].result.convergence_))


def compare_ece(case: Case, *, budget_s: float = 5.0, quick: bool = False) -> EceComparison:
    """Time the three ECE implementations, interleaved, on the same float32 probabilities."""
    probabilities, labels = case.probabilities, case.labels
    probabilities_t, labels_t = torch.from_numpy(probabilities), torch.from_numpy(labels)
    competitors = [
        Competitor("ours", lambda: ece_ours(probabilities, labels), **_repeats(quick, 5, 7)),
        Competitor(
            "torchmetrics", lambda: ece_torchmetrics(probabilities_t, labels_t), **_repeats(quick, 5, 7)
        ),
        Competitor("bin_loop", lambda: ece_bin_loop(probabilities, labels), **_repeats(quick, 3, 7)),
    ]
    return EceComparison(case, interleaved(competitors, budget_s=budget_s))


def warm_up() -> None:
    """Run every competitor once on a small problem: imports, thread pools and lazy initialisation."""
    case = make_case(2_000, 10, seed=SEED + 1)
    compare_fit(case, quick=True)
    compare_ece(case, quick=True)


# ------------------------------------------------------------------------------------------ report


def _time_cell(samples: Samples) -> str:
    return f"{format_seconds(samples.median)} ({len(samples)})"


def fit_time_table(results: list[FitComparison]) -> str:
    headers = ["data", "ours"]
    for name in ("sklearn_core", "sklearn_public", "lbfgs"):
        headers += [FIT_NAMES[name], "ours faster"]
    rows = []
    for result in results:
        ours = result.outcomes["ours"].samples
        row = [result.case.shape_label, _time_cell(ours)]
        for name in ("sklearn_core", "sklearn_public", "lbfgs"):
            other = result.outcomes[name].samples
            row += [_time_cell(other), format_ratio(ratio(other, ours))]
        rows.append(row)
    return markdown_table(headers, rows)


def fit_accuracy_table(results: list[FitComparison]) -> str:
    headers = ["data", "reference T", "reference NLL"]
    headers += [f"{FIT_NAMES[name]}: T, abs(NLL - ref)" for name in ("ours", "sklearn_core", "lbfgs")]
    headers += ["ours: Newton iterations", "sklearn public = core T"]
    rows = []
    for result in results:
        ref = result.reference
        row = [result.case.shape_label, f"{ref.temperature:.6f}", f"{ref.nll:.10f}"]
        for name in ("ours", "sklearn_core", "lbfgs"):
            outcome = result.outcomes[name]
            row.append(f"{outcome.temperature:.6f}, {outcome.gap(ref):.1e}")
        row.append(str(result.convergence.get("iterations", "?")))
        public, core = result.outcomes["sklearn_public"], result.outcomes["sklearn_core"]
        row.append("yes" if abs(public.temperature - core.temperature) <= 1e-12 * core.temperature else "no")
        rows.append(row)
    return markdown_table(headers, rows)


def ece_table(results: list[EceComparison]) -> str:
    headers = ["data", "ours", "torchmetrics", "ours faster", "bin loop (numpy)", "ours faster"]
    headers += ["ECE (ours)", "abs diff torchmetrics", "abs diff bin loop"]
    rows = []
    for result in results:
        ours, values = result.samples["ours"], result.values
        row = [result.case.shape_label, _time_cell(ours)]
        for name in ("torchmetrics", "bin_loop"):
            other = result.samples[name]
            row += [_time_cell(other), format_ratio(ratio(other, ours))]
        row += [
            f"{values['ours']:.8f}",
            f"{abs(values['torchmetrics'] - values['ours']):.1e}",
            f"{abs(values['bin_loop'] - values['ours']):.1e}",
        ]
        rows.append(row)
    return markdown_table(headers, rows)


def target_rows(fits: list[FitComparison], eces: list[EceComparison]) -> list[list[str]]:
    rows = []
    by_fit = {r.case.name: r for r in fits}
    by_ece = {r.case.name: r for r in eces}
    for size, wanted in FIT_TARGETS.items():
        if size not in by_fit:
            continue
        result = by_fit[size]
        ours = result.outcomes["ours"]
        speedup = ratio(result.outcomes["sklearn_core"].samples, ours.samples)
        gap = ours.gap(result.reference)
        met = speedup >= wanted and gap <= NLL_TOLERANCE
        rows.append(
            [
                f"fit {result.case.shape_label}: abs(NLL - ref) <= {NLL_TOLERANCE:g} at >= {wanted:g}x "
                "scikit-learn",
                f"{gap:.1e} at {format_ratio(speedup)}",
                "met" if met else "**missed**",
            ]
        )
    for size, wanted in ECE_TARGETS.items():
        if size not in by_ece:
            continue
        ece = by_ece[size]
        speedup = ratio(ece.samples["torchmetrics"], ece.samples["ours"])
        rows.append(
            [
                f"ECE {ece.case.shape_label}: >= {wanted:g}x torchmetrics",
                format_ratio(speedup),
                "met" if speedup >= wanted else "**missed**",
            ]
        )
    return rows


def versions() -> dict[str, str]:
    return {
        "torch threads": str(torch.get_num_threads()),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def _threads_note(info: dict[str, str]) -> list[str]:
    if "thread pools" not in info:
        return []
    return [
        "Thread pools were limited with `--threads` (torch's intra-op pool, OpenBLAS and the OpenMP "
        "runtimes), for every competitor alike. scikit-learn's temperature loss runs on one thread anyway. "
        "On a shared 2-core machine a pool of 2 threads stalls at every parallel operation whose second "
        "thread waits for a core that another process holds: with the default pools, the torch-based fits "
        "ran up to 10x slower and a float32 matrix-vector product in numpy 50x slower than on one thread, "
        "from one run to the next.",
        "",
    ]


def render(
    fits: list[FitComparison],
    eces: list[EceComparison],
    info: dict[str, str],
    command: str,
    total_s: float,
    budget_s: float,
) -> str:
    machine = ", ".join(f"{key} {value}" for key, value in info.items())
    parts = [
        "## Numerical core",
        "",
        f"Command: `{command}` (wall time {total_s:.0f} s). Machine: {machine}.",
        "",
        "Data: synthetic float32 logits `3 (onehot(y) + N(0, 1))` with uniform labels (seed 0; three times too sharp, so the optimal T is close to 3), and the "
        "real DenseNet-BC-100 / CIFAR-100 validation outputs from `tests/data`. Times are medians of the "
        'number of runs in brackets, run interleaved; "ours faster" is the other\'s median over ours. '
        f"At each size a first run shorter than a quarter of the time budget ({budget_s / 4:g} s for the fits, "
        f"{budget_s / 8:g} s for ECE) is a "
        "discarded warm-up; every competitor also ran once on a small problem first.",
        "",
        *_threads_note(info),
        "### Targets (issue #2)",
        "",
        markdown_table(["target", "measured", ""], target_rows(fits, eces)),
        "",
        "### Temperature fit: time",
        "",
        "ours: `TemperatureScaling().fit(logits, labels)` (validation included). scikit-learn "
        "`_TemperatureScaling`: `sklearn.calibration._TemperatureScaling().fit(logits, labels)`, the "
        'calibrator that `CalibratedClassifierCV(method="temperature")` fits, i.e. scikit-learn\'s whole '
        "numerical work; the targets are measured against it. scikit-learn CalibratedClassifierCV: the "
        'public route, `CalibratedClassifierCV(FrozenEstimator(clf), method="temperature", '
        "cv=[(all_rows, all_rows)]).fit(logits, labels)` with `clf.decision_function(X) = X` (one "
        'pass over all rows, as `cv="prefit"` used to do; the default 5-fold split would only add '
        "overhead). torch LBFGS recipe: `t = nn.Parameter(torch.ones(1) * 1.5)`, "
        "`optim.LBFGS([t], lr=0.01, max_iter=50)`, one `step` of a closure computing "
        "`CrossEntropyLoss()(logits / t, labels)` on float32 tensors.",
        "",
        fit_time_table(fits),
        "",
        "### Temperature fit: reached optimum",
        "",
        "Every T is scored by the same float64 NLL (blockwise logsumexp). Reference: "
        '`scipy.optimize.minimize_scalar(method="bounded")` on log T in [log 0.01, log 100], '
        "`xatol=1e-10`, on that float64 NLL.",
        "",
        fit_accuracy_table(fits),
        "",
        "### ECE (15 equal-width bins, top-label, L1)",
        "",
        "Same float32 probabilities (torch softmax of the logits) for all three. ours: "
        "`expected_calibration_error(probabilities, labels)` (validation included). torchmetrics: "
        '`multiclass_calibration_error(preds, target, num_classes, n_bins=15, norm="l1")` (its default '
        "argument validation included; bins `[lo, hi)` and float32 sums). bin loop: numpy max/argmax, "
        "then a Python loop over the 15 bins `(lo, hi]` with boolean masks.",
        "",
        ece_table(eces),
    ]
    return "\n".join(parts)


def profile_ours(case: Case) -> str:
    """cProfile of our fit and ECE on ``case``: where the time goes (top 25 by cumulative time)."""
    out = io.StringIO()
    for label, call in (
        ("TemperatureScaling.fit", lambda: fit_ours(case.logits, case.labels)),
        ("expected_calibration_error", lambda: ece_ours(case.probabilities, case.labels)),
    ):
        call()
        profiler = cProfile.Profile()
        profiler.runcall(call)
        out.write(f"\n==== {label} on {case.shape_label}\n")
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
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
    parser.add_argument("--write", action="store_true", help="replace the bench_core section of README")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--no-real", action="store_true", help="skip the real DenseNet / CIFAR-100 row")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of samples per fit competitor")
    parser.add_argument("--profile", choices=list(SIZES), help="profile ours on one size and exit")
    parser.add_argument(
        "--threads",
        type=int,
        help="limit torch, the BLAS libraries and the OpenMP runtimes to N threads each "
        "(default: the libraries' own choice, one per core)",
    )
    args = parser.parse_args(argv)
    limits = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        # numpy's and scipy's OpenBLAS, scikit-learn's and torch's OpenMP runtimes
        limits = threadpool_limits(limits=args.threads)

    if args.profile:
        print(profile_ours(make_case(*SIZES[args.profile], name=args.profile)))
        return 0

    started = time.perf_counter()
    info = machine_info(versions())
    if limits is not None:
        info["torch threads"] += " (--threads)"
        info["thread pools"] = ", ".join(
            f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info()
        )
    warm_up()
    cases: list[Case] = [make_case(*SIZES[name], name=name) for name in args.sizes]
    real = None if args.no_real else real_case()
    if real is not None:
        cases.append(real)
    fits, eces = [], []
    for case in cases:
        print(f"{case.name}: fit ...", file=sys.stderr, flush=True)
        fits.append(compare_fit(case, budget_s=args.budget))
        print(f"{case.name}: ECE ...", file=sys.stderr, flush=True)
        eces.append(compare_ece(case, budget_s=args.budget / 2))
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    text = render(fits, eces, info, _command(), time.perf_counter() - started, args.budget)
    print(text)
    if args.write:
        replace_section(README, SECTION, text, intro=README_INTRO)
        print(f"\nwrote the {SECTION} section of {README.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
