"""Multi-label models: every multi-label method fitted on a validation split and scored on a test split
(macro and micro NLL, ECE, Brier), with fit and transform times next to scikit-learn's
``CalibratedClassifierCV`` fitted per label (its sigmoid and isotonic methods on frozen logits).

tests/data holds no multi-label set, so the sets are made here, deterministically:

- ``synthetic``: K = 10 labels, true logits ``u ~ N(bias_k, 2^2)``, outcomes ``Bernoulli(sigmoid(u))``, the
  model's logits ``T_k u`` with ``T_k`` from 0.6 to 3 (each label miscalibrated by its own temperature);
- ``naive bayes`` and ``logistic``: scikit-learn's ``make_multilabel_classification`` (8 labels, 20 count
  features), one Gaussian naive Bayes (over-confident) or logistic regression (C = 1) per label trained on
  a third of the rows, its logits (log-odds) on the other two thirds split into validation and test.

Run: ``.venv/bin/python bench/bench_multilabel.py --write`` (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import format_seconds, machine_info, markdown_table, replace_section, time_call  # noqa: E402

from service.core.calibrators import PerLabelCalibration  # noqa: E402
from service.core.multilabel import label_figures  # noqa: E402
from tests.helpers.peers import IdentityClassifier  # noqa: E402  (the adapters the differential tests use)

METHODS = {
    "uncalibrated": None,
    "temperature": ("temperature", {}),
    "shared_temperature": ("shared_temperature", {}),
    "platt": ("platt", {}),
    "platt, smooth targets": ("platt", {"smooth_targets": True}),
    "isotonic": ("isotonic", {}),
    "sklearn sigmoid (per label)": "sklearn:sigmoid",
    "sklearn isotonic (per label)": "sklearn:isotonic",
}


def synthetic(n: int, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    temperatures = np.linspace(0.6, 3.0, k)
    biases = np.linspace(-2.0, 1.0, k)
    truth = rng.normal(size=(n, k)) * 2.0 + biases
    labels = (rng.random((n, k)) < 1.0 / (1.0 + np.exp(-truth))).astype(np.int8)
    return truth * temperatures, labels


def trained(kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import make_multilabel_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB

    x, y = make_multilabel_classification(
        n_samples=9000, n_features=20, n_classes=8, n_labels=2, random_state=0
    )
    train, val, test = np.split(np.arange(9000), [3000, 6000])
    columns = []
    for k in range(y.shape[1]):
        model = GaussianNB() if kind == "naive bayes" else LogisticRegression(C=1.0, max_iter=2000)
        model.fit(x[train], y[train, k])
        if kind == "naive bayes":
            log_p = model.predict_log_proba(x)
            columns.append(np.clip(log_p[:, 1] - log_p[:, 0], -700, 700))
        else:
            columns.append(model.decision_function(x))
    logits = np.stack(columns, axis=1)
    return {"val": (logits[val], y[val]), "test": (logits[test], y[test])}


class SklearnPerLabel:
    """scikit-learn's CalibratedClassifierCV on frozen logits, one per label."""

    def __init__(self, method: str) -> None:
        self.method = method

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> SklearnPerLabel:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.frozen import FrozenEstimator

        self.fitted = []
        for k in range(logits.shape[1]):
            x, y = logits[:, [k]], labels[:, k]
            frozen = FrozenEstimator(IdentityClassifier().fit(x, y))
            self.fitted.append(CalibratedClassifierCV(frozen, method=self.method).fit(x, y))
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        return np.stack([c.predict_proba(logits[:, [k]])[:, 1] for k, c in enumerate(self.fitted)], axis=1)


def make(spec):
    if isinstance(spec, str):
        return SklearnPerLabel(spec.split(":")[1])
    method, options = spec
    return PerLabelCalibration(method, **options)


def run(sets: dict, repeats: int) -> list[dict]:
    rows = []
    for name, splits in sets.items():
        (fit_z, fit_y), (test_z, test_y) = splits["val"], splits["test"]
        for label, spec in METHODS.items():
            if spec is None:
                figures = label_figures(test_y, logits=test_z)
                rows.append(
                    {"set": name, "method": label, **_scores(figures), "fit": None, "transform": None}
                )
                continue
            fit_times, transform_times = [], []
            for _ in range(repeats):
                seconds, calibrator = time_call(lambda s=spec, z=fit_z, y=fit_y: make(s).fit(z, y))
                fit_times.append(seconds)
                seconds, probabilities = time_call(lambda c=calibrator, z=test_z: c.transform(z))
                transform_times.append(seconds)
            figures = label_figures(test_y, probabilities=probabilities)
            rows.append(
                {
                    "set": name,
                    "method": label,
                    **_scores(figures),
                    "fit": statistics.median(fit_times),
                    "transform": statistics.median(transform_times),
                }
            )
            print(name, label, rows[-1], flush=True)
    return rows


def _scores(figures: dict) -> dict:
    return {
        "nll_macro": figures["macro"]["nll"],
        "nll_micro": figures["micro"]["nll"],
        "ece_macro": figures["macro"]["ece"],
        "ece_micro": figures["micro"]["ece"],
        "brier_macro": figures["macro"]["brier"],
    }


def report(rows: list[dict], args: argparse.Namespace, info: dict, wall_s: float, sizes: dict) -> str:
    headers = [
        "set",
        "method",
        "NLL macro",
        "NLL micro",
        "ECE macro",
        "ECE micro",
        "Brier macro",
        "fit",
        "transform",
    ]

    def number(value: float) -> str:
        return "inf" if not np.isfinite(value) else f"{value:.4f}"

    table = markdown_table(
        headers,
        [
            [
                row["set"],
                row["method"],
                number(row["nll_macro"]),
                number(row["nll_micro"]),
                number(row["ece_macro"]),
                number(row["ece_micro"]),
                number(row["brier_macro"]),
                "" if row["fit"] is None else format_seconds(row["fit"]),
                "" if row["transform"] is None else format_seconds(row["transform"]),
            ]
            for row in rows
        ],
    )
    described = "; ".join(f"{name}: {fit} fit rows, {test} test rows" for name, (fit, test) in sizes.items())
    machine = ", ".join(f"{key} {value}" for key, value in info.items())
    return "\n\n".join(
        [
            "## Multi-label models: every method on three sets (`bench/bench_multilabel.py`)",
            f"Command: `.venv/bin/python bench/bench_multilabel.py --repeats {args.repeats} --write` (wall time "
            f"{wall_s:.0f} s). No real multi-label set is in tests/data: the sets are made by the script "
            f"(its docstring says how). {described}. Figures on the test rows, per label with 15 equal-width "
            "bins of the positive-class probability, macro = mean over labels, micro = all (row, label) pairs "
            "pooled. Fit and transform times are medians of "
            f"{args.repeats} runs in one process; scikit-learn's rows are CalibratedClassifierCV per label "
            "on frozen logits (its sigmoid uses Platt's smoothed targets, as `platt, smooth targets` does).",
            table,
            f"Machine: {machine}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-rows", type=int, default=50_000, help="rows of the synthetic fit split")
    parser.add_argument("--write", action="store_true", help="write the section into bench/README.md")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    sets = {
        "synthetic": {"val": synthetic(args.fit_rows, seed=0), "test": synthetic(args.fit_rows // 2, seed=1)},
        "naive bayes": trained("naive bayes"),
        "logistic": trained("logistic"),
    }
    sizes = {name: (len(s["val"][1]), len(s["test"][1])) for name, s in sets.items()}
    rows = run(sets, args.repeats)
    text = report(rows, args, info, time.perf_counter() - started, sizes)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_multilabel", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
