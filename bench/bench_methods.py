"""Which calibration method wins where: every method fitted on the validation half of each real set in
``tests/data`` and scored on its test half (NLL, ECE, Brier), with fit and transform times.

The plain isotonic curve (``floor=0``) and plain histogram binning (``floor=0, prior_strength=0``) are shown
beside the defaults, so the table shows what the floor and the smoothing change (an infinite NLL where a
test row's true class got probability 0).

Run: ``.venv/bin/python bench/bench_methods.py --write`` (about a minute).
"""

from __future__ import annotations

import argparse
import functools
import math
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

from service.core.calibrators import make_calibrator  # noqa: E402
from service.core.metrics import brier_score, expected_calibration_error  # noqa: E402

DATA = REPO / "tests" / "data"
METHODS = {
    "uncalibrated": None,
    "temperature": ("temperature", {}),
    "ensemble temperature": ("ensemble_temperature", {}),
    "vector": ("vector", {}),
    "matrix": ("matrix", {}),
    "dirichlet, reg cv": ("dirichlet", {"reg": "cv"}),
    "isotonic": ("isotonic", {}),
    "isotonic, floor 0": ("isotonic", {"floor": 0}),
    "histogram": ("histogram", {}),
    "histogram, plain": ("histogram", {"floor": 0, "prior_strength": 0}),
}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    true = probabilities[np.arange(len(labels)), labels]
    with np.errstate(divide="ignore"):
        nll = float(-np.log(true).mean())
    return {
        "nll": nll,
        "zero_rows": int((true == 0).sum()),
        "ece": expected_calibration_error(probabilities, labels),
        "brier": brier_score(probabilities, labels),
    }


def measure(name: str, repeats: int) -> list[dict]:
    data = np.load(DATA / name)
    fit_z, fit_y = data["logits_val"].astype(np.float64), data["labels_val"]
    test_z, test_y = data["logits_test"].astype(np.float64), data["labels_test"]
    rows = []
    for label, spec in METHODS.items():
        if spec is None:
            rows.append({"set": name, "method": label, **scores(softmax(test_z), test_y)})
            continue
        method, options = spec
        fit_times, transform_times = [], []
        for _ in range(repeats):
            fit = functools.partial(make_calibrator(method, **options).fit, fit_z, fit_y)
            seconds, calibrator = time_call(fit)
            fit_times.append(seconds)
            seconds, probabilities = time_call(functools.partial(calibrator.transform, test_z))
            transform_times.append(seconds)
        rows.append(
            {
                "set": name,
                "method": label,
                **scores(probabilities, test_y),
                "fit_s": statistics.median(fit_times),
                "transform_s": statistics.median(transform_times),
            }
        )
    return rows


def number(value: float, digits: int = 4) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def report(rows: list[dict], args: argparse.Namespace, info: dict, wall_s: float) -> str:
    table = markdown_table(
        ["set", "method", "test NLL", "rows with p(true) = 0", "test ECE", "test Brier", "fit", "transform"],
        [
            [
                row["set"].removesuffix(".npz"),
                row["method"],
                number(row["nll"]),
                row["zero_rows"],
                number(row["ece"]),
                number(row["brier"]),
                format_seconds(row["fit_s"]) if "fit_s" in row else "",
                format_seconds(row["transform_s"]) if "transform_s" in row else "",
            ]
            for row in rows
        ],
    )
    best = []
    for name in sorted({row["set"] for row in rows}):
        of_set = [row for row in rows if row["set"] == name]
        for figure in ("nll", "ece", "brier"):
            winner = min(of_set, key=lambda row: row[figure])
            best.append(
                f"{name.removesuffix('.npz')}: lowest {figure} {winner['method']} ({number(winner[figure])})"
            )
    return "\n".join(
        [
            "## Which method where: every method on the real sets (`bench/bench_methods.py`)",
            "",
            f"Command: `.venv/bin/python bench/bench_methods.py --repeats {args.repeats} --write` (wall time "
            f"{wall_s:.0f} s). Each method is fitted with its default options on `logits_val` / `labels_val` of "
            "each set in `tests/data` and scored on `logits_test` / `labels_test` (float64 logits): NLL of the "
            "true class (infinite when a row's true class has probability 0; the rows where it has are "
            "counted), top-label ECE (15 equal-width bins), Brier. Fit and transform times are medians of "
            f"{args.repeats} runs in one process. `isotonic, floor 0` and `histogram, plain` are the curves "
            "without the probability floor and the base-rate smoothing of the defaults.",
            "",
            table,
            "",
            *[f"- {line}" for line in best],
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=sorted(path.name for path in DATA.glob("*.npz")))
    parser.add_argument("--write", action="store_true", help="write the section into bench/README.md")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    info = machine_info()
    rows = [row for name in args.sets for row in measure(name, args.repeats)]
    text = report(rows, args, info, time.perf_counter() - began)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_methods", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
