"""Which calibration method wins where: every method fitted on the validation half of each real set in
``tests/data`` and scored on its test half (NLL, ECE, Brier), with fit and transform times.

The plain isotonic curve (``floor=0``) and plain histogram binning (``floor=0, prior_strength=0``) are shown
beside the defaults, so the table shows what the floor and the smoothing change (an infinite NLL where a
test row's true class got probability 0).

``--peers`` adds a second section: fit and transform times of the methods of issue #16 (beta, Dirichlet,
ensemble temperature scaling, Venn-Abers) next to the peer package that implements the same map, on the
real sets and on a synthetic 1M x 10 set, with the ratios taken in the same run.

Run: ``.venv/bin/python bench/bench_methods.py --write`` (a few minutes), ``--peers`` for the peers too.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import (  # noqa: E402
    format_ratio,
    format_seconds,
    machine_info,
    markdown_table,
    replace_section,
    time_call,
)

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
    "venn abers": ("venn_abers", {}),
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
            f"Command: `.venv/bin/python bench/bench_methods.py --repeats {args.repeats}"
            f"{' --peers' if args.peers else ''} --write` (wall time "
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


# ------------------------------------------------------------------------------------------ peers


@dataclass
class PeerRow:
    """One method on one data set: ours and the peer's fit and transform seconds (None: not run)."""

    data: str
    method: str
    peer: str
    rows: int
    ours_fit: float
    ours_transform: float
    peer_fit: float | None = None
    peer_transform: float | None = None
    note: str = ""


def top_label_problem(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A binary problem from a multiclass one: the top class's margin over the runner-up, and whether the
    top class is right (what a binary calibrator of the model's confidence sees)."""
    ordered = np.partition(logits, logits.shape[1] - 2, axis=1)
    return ordered[:, -1] - ordered[:, -2], (logits.argmax(axis=1) == labels).astype(np.int64)


def synthetic(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident logits: labels drawn from softmax(z / 2)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, k))
    p = softmax(z / 2.0)
    return z, (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)


def _ours(method: str, fit_z: np.ndarray, fit_y: np.ndarray, test_z: np.ndarray) -> tuple[float, float]:
    fit_s, calibrator = time_call(functools.partial(make_calibrator(method).fit, fit_z, fit_y))
    transform_s, _ = time_call(functools.partial(calibrator.transform, test_z))
    return fit_s, transform_s


def _betacal(margin: np.ndarray, hit: np.ndarray, test_margin: np.ndarray) -> tuple[float, float]:
    from betacal import BetaCalibration
    from scipy.special import expit

    scores, test_scores = expit(margin), expit(test_margin)
    fit_s, fitted = time_call(functools.partial(BetaCalibration(parameters="abm").fit, scores, hit))
    transform_s, _ = time_call(functools.partial(fitted.predict, test_scores))
    return fit_s, transform_s


def _venn_abers_binary(margin: np.ndarray, hit: np.ndarray, test_margin: np.ndarray) -> tuple[float, float]:
    from venn_abers import VennAbers

    two = np.stack([-margin, margin], axis=1)
    fit_s, fitted = time_call(functools.partial(VennAbers().fit, two, hit))
    transform_s, _ = time_call(
        functools.partial(fitted.predict_proba, np.stack([-test_margin, test_margin], 1))
    )
    return fit_s, transform_s


def _venn_abers_multiclass(z: np.ndarray, y: np.ndarray, test_z: np.ndarray) -> tuple[float, None]:
    """The package's one-vs-rest fits and transforms in one call (``predict_proba_prefitted_va``), on the
    same scores as ours (the rival margins), so its time is fit + transform."""
    from venn_abers.venn_abers import predict_proba_prefitted_va

    from service.core.calibrators.venn_abers import rival_margins

    call = functools.partial(
        predict_proba_prefitted_va, rival_margins(z), y, rival_margins(test_z), va_tpe="one_vs_rest"
    )
    seconds, _ = time_call(call)
    return seconds, None


def _netcal_dirichlet(z: np.ndarray, y: np.ndarray, test_z: np.ndarray) -> tuple[float, float]:
    """netcal's LogisticCalibration on probabilities: matrix scaling of their logs, the unregularised
    Dirichlet map (netcal has no Dirichlet calibrator of that name), fitted by its own torch loop."""
    import warnings

    from netcal.scaling import LogisticCalibration

    model = LogisticCalibration(method="mle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_s, _ = time_call(functools.partial(model.fit, softmax(z), y))
        transform_s, _ = time_call(functools.partial(model.transform, softmax(test_z)))
    return fit_s, transform_s


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def measure_peers(name: str, fit_z, fit_y, test_z, *, peer_rows: int) -> list[PeerRow]:
    """Every pairing on one data set; a peer whose cost grows too fast runs on the first ``peer_rows`` rows
    (ours again on the same rows beside it, for the ratio)."""
    rows: list[PeerRow] = []
    n = len(fit_y)
    margin, hit = top_label_problem(fit_z, fit_y)
    test_margin, _ = top_label_problem(test_z, np.zeros(len(test_z), dtype=np.int64))

    def pair(method, peer, peer_call, ours_args, peer_args, *, subsample: bool, note: str = "") -> None:
        label = f"{method}, {note.split(';')[0]}" if note.startswith(("top-label", "one-vs-rest")) else method
        ours_fit, ours_transform = _ours(method, *ours_args)
        if not _installed(peer.split()[0].replace("-", "_")):
            rows.append(PeerRow(name, label, peer, n, ours_fit, ours_transform, note="peer not installed"))
            return
        if subsample and n > peer_rows:
            rows.append(
                PeerRow(name, label, peer, n, ours_fit, ours_transform, note=f"peer: see {peer_rows:,} rows")
            )
            cut = [array[:peer_rows] for array in ours_args]
            ours_fit, ours_transform = _ours(method, *cut)
            peer_fit, peer_transform = peer_call(*[array[:peer_rows] for array in peer_args])
            rows.append(
                PeerRow(
                    name, label, peer, peer_rows, ours_fit, ours_transform, peer_fit, peer_transform, note
                )
            )
            return
        peer_fit, peer_transform = peer_call(*peer_args)
        rows.append(PeerRow(name, label, peer, n, ours_fit, ours_transform, peer_fit, peer_transform, note))

    binary = (margin[:, None], hit, test_margin[:, None])
    margins = (margin, hit, test_margin)
    pair("beta", "betacal", _betacal, binary, margins, subsample=False, note="top-label problem")
    pair(
        "venn_abers",
        "venn-abers",
        _venn_abers_binary,
        binary,
        margins,
        subsample=True,
        note="top-label problem",
    )
    multiclass = (fit_z, fit_y, test_z)
    pair(
        "venn_abers",
        "venn-abers",
        _venn_abers_multiclass,
        multiclass,
        multiclass,
        subsample=True,
        note="one-vs-rest; the peer's time is fit + transform",
    )
    pair(
        "dirichlet",
        "netcal LogisticCalibration",
        _netcal_dirichlet,
        multiclass,
        multiclass,
        subsample=True,
        note="netcal: unregularised, on softmax probabilities",
    )
    ours_fit, ours_transform = _ours("ensemble_temperature", *multiclass)
    rows.append(
        PeerRow(
            name,
            "ensemble_temperature",
            "none",
            n,
            ours_fit,
            ours_transform,
            note="no package on PyPI (Mix-n-Match's code is scripts)",
        )
    )
    return rows


def peers_report(rows: list[PeerRow], args: argparse.Namespace, info: dict, wall_s: float) -> str:
    def seconds(value: float | None) -> str:
        return "" if value is None else format_seconds(value)

    def times(peer: float | None, ours: float) -> str:
        return "" if peer is None else format_ratio(peer / ours)

    table = markdown_table(
        [
            "data",
            "method",
            "rows",
            "ours fit",
            "ours transform",
            "peer",
            "peer fit",
            "peer transform",
            "fit: peer / ours",
            "transform: peer / ours",
            "note",
        ],
        [
            [
                row.data,
                row.method,
                f"{row.rows:,}",
                seconds(row.ours_fit),
                seconds(row.ours_transform),
                row.peer,
                seconds(row.peer_fit),
                seconds(row.peer_transform),
                times(
                    row.peer_fit,
                    row.ours_fit if row.peer_transform is not None else row.ours_fit + row.ours_transform,
                ),
                times(row.peer_transform, row.ours_transform),
                row.note,
            ]
            for row in rows
        ],
    )
    return "\n".join(
        [
            "## New methods next to their peer packages (`bench/bench_methods.py --peers`)",
            "",
            f"Command: `.venv/bin/python bench/bench_methods.py --repeats {args.repeats} --peers "
            f"--synthetic-rows {args.synthetic_rows} --peer-rows {args.peer_rows} --write` (wall time of both "
            f"sections {wall_s:.0f} s). One fit and one transform each, ours then the peer's, in one process "
            "(a shared 2-core machine: single runs, so read ratios within a factor of about 1.5). Real sets: "
            "fit on `logits_val`, transform `logits_test` (5,000 rows each). `synthetic`: "
            f"{args.synthetic_rows:,} x 10 over-confident logits (labels from softmax(z / 2)), transformed "
            "whole. Binary methods (beta, and Venn-Abers marked top-label) calibrate the top class's margin "
            "over the runner-up against whether the top class is right. Peers that grow faster than linearly "
            f"(the venn-abers package, netcal's torch loop) run on the first {args.peer_rows:,} fit rows where a "
            "set is larger, with ours timed again on the same rows for the ratio; the row of ours on all rows "
            "says so. Ratios above 1: ours is faster. venn-abers is given our scores (it only sorts them), "
            "so both compute the same IVAP (tests/core/test_venn_abers.py checks they agree to 1e-12).",
            "",
            table,
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def warm_up() -> None:
    """Import what the fits import (torch, scipy.optimize, scikit-learn) before anything is timed."""
    z, y = synthetic(300, 3, seed=1)
    for method in ("temperature", "vector", "isotonic", "venn_abers", "dirichlet", "ensemble_temperature"):
        make_calibrator(method).fit(z, y).transform(z)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=sorted(path.name for path in DATA.glob("*.npz")))
    parser.add_argument("--write", action="store_true", help="write the section into bench/README.md")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--peers", action="store_true", help="time the new methods against peer packages")
    parser.add_argument("--synthetic-rows", type=int, default=1_000_000, help="rows of the synthetic set")
    parser.add_argument("--peer-rows", type=int, default=20_000, help="most fit rows of a slow peer")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    info = machine_info()
    warm_up()
    rows = [row for name in args.sets for row in measure(name, args.repeats)]
    text = report(rows, args, info, time.perf_counter() - began)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_methods", text, intro="# Benchmarks")
    if args.peers:
        peer_rows = []
        for name in args.sets:
            data = np.load(DATA / name)
            peer_rows += measure_peers(
                name.removesuffix(".npz"),
                data["logits_val"].astype(np.float64),
                data["labels_val"],
                data["logits_test"].astype(np.float64),
                peer_rows=args.peer_rows,
            )
            print(peer_rows[-1], flush=True)
        z, y = synthetic(args.synthetic_rows, 10, seed=0)
        peer_rows += measure_peers(
            f"synthetic {args.synthetic_rows:,} x 10", z, y, z, peer_rows=args.peer_rows
        )
        text = peers_report(peer_rows, args, info, time.perf_counter() - began)
        print(text)
        if args.write:
            replace_section(args.readme, "bench_method_peers", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
