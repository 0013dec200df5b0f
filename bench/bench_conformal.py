"""Conformal prediction sets on the real sets in ``tests/data``: coverage and set sizes of each score and mode
on the test half, with the calibrator and the threshold fitted on the validation half (split half and half,
the default, or both on the same rows), and the time to fit a threshold and build sets next to MAPIE.

Run: ``.venv/bin/python bench/bench_conformal.py --write`` (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import format_seconds, machine_info, markdown_table, replace_section, time_call  # noqa: E402

from service import workflows  # noqa: E402
from service.core import conformal  # noqa: E402
from tests.helpers.peers import RowLookup  # noqa: E402  (the adapters the differential tests use)

DATA = REPO / "tests" / "data"
MODES = {
    "lac": {"score": "lac"},
    "lac, mondrian": {"score": "lac", "mondrian": True},
    "aps": {"score": "aps"},
    "aps, randomised": {"score": "aps", "randomized": True},
    "raps": {"score": "raps"},
    "raps, randomised": {"score": "raps", "randomized": True},
}


def coverage_rows(name: str, alpha: float) -> list[dict]:
    data = np.load(DATA / name)
    rows = []
    methods = ["temperature"] if data["logits_val"].shape[1] > 10 else ["temperature", "matrix"]
    for method in methods:
        for fraction in (0.5, 0.0):
            for label, options in MODES.items():
                document = workflows.fit_conformal_document(
                    data["logits_val"],
                    data["labels_val"],
                    conformal={**options, "alpha": alpha},
                    conformal_fraction=fraction,
                    method=method,
                )
                report = workflows.evaluate(
                    data["logits_test"], data["labels_test"], calibrator_document=document
                )
                figures = report["conformal"]
                rows.append(
                    {
                        "set": name.removesuffix(".npz"),
                        "method": method,
                        "split": "half / half" if fraction else "same rows",
                        "sets": label,
                        **{
                            key: figures[key]
                            for key in ("coverage", "worst_class_coverage", "mean_set_size", "empty_sets")
                        },
                    }
                )
    return rows


def timing_rows(n: int, n_classes: int, repeats: int) -> list[dict]:
    """Threshold fit plus sets for n calibration and n test rows: ours against MAPIE's SplitConformalClassifier
    (prefit, the same probabilities)."""
    from mapie.classification import SplitConformalClassifier

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(2 * n, n_classes))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    labels = (probabilities.cumsum(axis=1) > rng.uniform(size=(2 * n, 1))).argmax(axis=1)
    estimator = RowLookup(probabilities)
    estimator.classes_ = np.arange(n_classes)
    estimator.n_features_in_ = 1
    X = np.arange(2 * n)[:, None]
    rows = []
    for score in ("lac", "aps", "raps"):
        spec = conformal.conformal_spec({"score": score, "randomized": score != "lac"})

        def ours(spec=spec):
            fitted = conformal.fit_thresholds(
                probabilities[:n], labels[:n], spec, rng=np.random.default_rng(1)
            )
            return conformal.prediction_sets(probabilities[n:], fitted, rng=np.random.default_rng(2))

        def peer(score=score):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = SplitConformalClassifier(
                    estimator, conformity_score=score, prefit=True, random_state=1
                )
                model.conformalize(X[:n], labels[:n])
                params = {"include_last_label": "randomized"} if score != "lac" else None
                return model.predict_set(X[n:], conformity_score_params=params)

        ours_s = statistics.median(time_call(ours)[0] for _ in range(repeats))
        peer_s = statistics.median(time_call(peer)[0] for _ in range(repeats))
        rows.append({"case": f"{n:,} x {n_classes}", "score": score, "ours": ours_s, "mapie": peer_s})
    return rows


def report(
    coverage: list[dict], timing: list[dict], args: argparse.Namespace, info: dict, wall_s: float
) -> str:
    table = markdown_table(
        ["set", "calibrator", "split", "sets", "coverage", "worst class", "mean size", "empty"],
        [
            [
                row["set"],
                row["method"],
                row["split"],
                row["sets"],
                f"{row['coverage']:.4f}",
                f"{row['worst_class_coverage']:.4f}",
                f"{row['mean_set_size']:.3f}",
                f"{row['empty_sets']:.4f}",
            ]
            for row in coverage
        ],
    )
    times = markdown_table(
        ["calibration x test rows", "score (randomised aps/raps)", "calibserve", "MAPIE 1.6", "MAPIE / ours"],
        [
            [
                row["case"],
                row["score"],
                format_seconds(row["ours"]),
                format_seconds(row["mapie"]),
                f"{row['mapie'] / row['ours']:.1f}x",
            ]
            for row in timing
        ],
    )
    return "\n".join(
        [
            "## Conformal prediction sets (`bench/bench_conformal.py`)",
            "",
            f"Command: `.venv/bin/python bench/bench_conformal.py --write` (wall time {wall_s:.0f} s). "
            f"alpha = {args.alpha}. The calibrator and the threshold are fitted on `logits_val` / `labels_val` "
            "(`half / half`: the default `conformal_fraction` 0.5, each class's rows split by a seeded "
            "permutation; `same rows`: `conformal_fraction` 0) and the sets scored on `logits_test` / "
            "`labels_test` (5,000 rows). Coverage: share of test rows whose label is in its set; worst class: "
            "the lowest per-class coverage. Not randomised APS/RAPS sets include the class that crosses the "
            "threshold: conservative on accurate models.",
            "",
            table,
            "",
            "Time to fit the threshold on the calibration rows and build the sets of as many test rows (medians "
            f"of {args.repeats} runs), against MAPIE's `SplitConformalClassifier` (prefit, the same "
            "probabilities; its RAPS also chooses k_reg and lambda on 10 % of the rows):",
            "",
            times,
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000, help="calibration (and test) rows of the timing")
    parser.add_argument("--sets", nargs="+", default=sorted(path.name for path in DATA.glob("*.npz")))
    parser.add_argument("--write", action="store_true", help="write the section into bench/README.md")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    info = machine_info()
    coverage = [row for name in args.sets for row in coverage_rows(name, args.alpha)]
    timing = timing_rows(args.rows, 10, args.repeats)
    text = report(coverage, timing, args, info, time.perf_counter() - began)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_conformal", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
