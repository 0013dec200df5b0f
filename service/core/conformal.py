"""Split-conformal prediction sets over calibrated probabilities: scores, thresholds, sets, coverage figures.

Given ``n`` held-out labelled rows with (calibrated) probabilities ``p(x)`` and a conformity score ``s(x, y)``
(small when ``y`` is plausible), the threshold is the finite-sample quantile of the ``n`` calibration scores

.. math::  \\hat q = s_{(k)}, \\qquad k = \\lceil (n + 1)(1 - \\alpha) \\rceil,

the ``k``-th smallest score (the empirical ``k/n`` quantile, numpy's ``method="lower"``), and the set of a new
row is ``C(x) = \\{y : s(x, y) \\le \\hat q\\}``. On exchangeable data ``P(Y \\in C(X)) \\ge 1 - \\alpha``, and
below ``1 - \\alpha + 1/(n + 1)`` when the scores have no ties (Vovk et al. 2005; Lei et al. 2018). The
threshold is finite only when ``k <= n``, i.e. ``n >= (1 - alpha) / alpha``: with fewer rows the set would
have to hold every class, and :func:`conformal_quantile` says so.

Scores (``p_(1) >= p_(2) >= ...`` the sorted row, ``r(y)`` the 1-based rank of ``y`` in it, ties by column
order, ``c_j = p_(1) + ... + p_(j)`` the cumulative mass, ``u ~ U(0, 1)`` one draw per row):

- ``lac`` (least ambiguous set-valued classifier, Sadinle, Lei, Wasserman 2019): ``s = 1 - p_y``.
- ``aps`` (adaptive prediction sets, Romano, Sesia, Candès 2020): ``s = c_{r(y)}``, randomised
  ``s = c_{r(y)} - u p_y``.
- ``raps`` (regularised APS, Angelopoulos, Bates, Malik, Jordan 2021): the APS score plus
  ``lambda * max(0, r(y) - k_reg)``, which shrinks sets by penalising classes ranked below ``k_reg``.

Set construction follows MAPIE (``mapie.classification.SplitConformalClassifier``, v1), the peer the tests
compare with. LAC: ``{y : 1 - p_y <= q}`` (may be empty). APS and RAPS, not randomised: the classes in
order of probability up to and including the first whose regularised cumulative score reaches ``q``
(Romano et al.'s "include the last label": never empty, a superset of ``{y : s(x, y) <= q}``, so coverage
holds); randomised: exactly ``{y : s(x, y, u) <= q}`` with the row's own ``u``, which drops the last label
with probability ``(c_L - q) / p_(L)`` as Romano et al. (2020) do, and may be empty. Every comparison
allows :data:`TOLERANCE` (MAPIE's 1e-8), so a probability computed again in float32 (or on a GPU) at serving
time does not drop a class that sits on the threshold.

Mondrian (class-conditional) coverage (Vovk et al. 2005; Vovk 2012): one threshold per class, fitted on the
calibration rows of that class only, and ``y`` is in the set when its own score passes its own threshold
(``P(Y in C(X) | Y = y) >= 1 - alpha`` for every ``y``). Each class then needs ``(1 - alpha) / alpha`` rows.

References
----------
Sadinle, Lei, Wasserman (2019). Least ambiguous set-valued classifiers with bounded error levels. JASA.
Romano, Sesia, Candès (2020). Classification with valid and adaptive coverage. NeurIPS.
Angelopoulos, Bates, Malik, Jordan (2021). Uncertainty sets for image classifiers using conformal
prediction. ICLR.
Vovk, Gammerman, Shafer (2005). Algorithmic Learning in a Random World. Springer (Mondrian conformal
predictors, ch. 4.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidParameter

SCORES = ("lac", "aps", "raps")
TOLERANCE = 1e-8
"""Slack of every comparison of a score with a threshold (MAPIE's ``EPSILON``)."""
DEFAULT_RAPS_K_REG = 1
DEFAULT_RAPS_LAMBDA = 0.01
QUANTILE_RULE = (
    "split conformal: the threshold is the k-th smallest of the n conformity scores of the calibration rows, "
    "k = ceil((n + 1) * (1 - alpha)) (the ceil((n+1)(1-alpha))/n empirical quantile), computed on the "
    "calibrated probabilities of this calibrator version"
)


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class ConformalSpec:
    """What a conformal fit is asked for (checked by :func:`conformal_spec`)."""

    score: str = "lac"
    alpha: float = 0.1
    mondrian: bool = False
    randomized: bool = False
    k_reg: int | None = None  # raps only
    lam: float | None = None  # raps only ("lambda" in documents and bodies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "alpha": self.alpha,
            "mondrian": self.mondrian,
            "randomized": self.randomized,
            "k_reg": self.k_reg,
            "lambda": self.lam,
        }


_SPEC_KEYS = ("score", "alpha", "mondrian", "randomized", "k_reg", "lambda")


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameter(
            f"conformal.{name} must be true or false, got {value!r}", field=f"conformal.{name}"
        )
    return value


def conformal_spec(options: Mapping[str, Any], *, allowed: tuple[str, ...] = ()) -> ConformalSpec:
    """Check a ``conformal`` object (``score``, ``alpha``, ``mondrian``, ``randomized``, ``k_reg``,
    ``lambda``); InvalidParameter naming the first bad field. ``allowed``: further keys a caller reads."""
    if not isinstance(options, Mapping):
        raise InvalidParameter(
            'conformal must be an object such as {"score": "lac", "alpha": 0.1}', field="conformal"
        )
    unknown = sorted(set(options) - set(_SPEC_KEYS) - set(allowed))
    if unknown:
        raise InvalidParameter(
            f"conformal has unknown field(s) {', '.join(unknown)}; known: {', '.join(_SPEC_KEYS + allowed)}",
            field=f"conformal.{unknown[0]}",
        )
    score = options.get("score", "lac")
    if score not in SCORES:
        raise InvalidParameter(
            f"conformal.score must be one of {', '.join(SCORES)}, got {score!r}", field="conformal.score"
        )
    alpha = options.get("alpha", 0.1)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 1.0:
        raise InvalidParameter(
            f"conformal.alpha must be a number in (0, 1) (the miscoverage rate), got {alpha!r}",
            field="conformal.alpha",
        )
    mondrian = _flag(options.get("mondrian", False), "mondrian")
    randomized = _flag(options.get("randomized", False), "randomized")
    k_reg, lam = options.get("k_reg"), options.get("lambda")
    if score != "raps":
        for key, value in (("k_reg", k_reg), ("lambda", lam)):
            if value is not None:
                raise InvalidParameter(
                    f"conformal.{key} is a raps option; score {score!r} takes none", field=f"conformal.{key}"
                )
    else:
        k_reg = DEFAULT_RAPS_K_REG if k_reg is None else k_reg
        lam = DEFAULT_RAPS_LAMBDA if lam is None else lam
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise InvalidParameter(
                f"conformal.k_reg must be an integer >= 0, got {k_reg!r}", field="conformal.k_reg"
            )
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam < 0:
            raise InvalidParameter(
                f"conformal.lambda must be a finite number >= 0, got {lam!r}", field="conformal.lambda"
            )
        lam = float(lam)
    return ConformalSpec(score, float(alpha), mondrian, randomized, k_reg, lam)


# ---------------------------------------------------------------------------------------------- scores


def _sorted_view(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, ranks, cumulative)``: columns by decreasing probability (ties by column), each column's
    1-based rank, and the cumulative mass ``c_j`` in sorted order."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, probabilities.shape[1] + 1)[None, :], axis=1)
    cumulative = np.cumsum(np.take_along_axis(probabilities, order, axis=1), axis=1)
    return order, ranks, cumulative


def _penalty(ranks: np.ndarray, spec: ConformalSpec) -> np.ndarray | float:
    if spec.score != "raps" or not spec.lam:
        return 0.0
    return spec.lam * np.maximum(ranks - spec.k_reg, 0)


def score_matrix(probabilities: np.ndarray, spec: ConformalSpec, u: np.ndarray | None = None) -> np.ndarray:
    """``s(x, y)`` of every row and every class, ``(n, K)`` float64; ``u`` (one per row) for randomised
    APS/RAPS."""
    p = np.asarray(probabilities, dtype=np.float64)
    if spec.score == "lac":
        return 1.0 - p
    _, ranks, cumulative = _sorted_view(p)
    scores = np.take_along_axis(cumulative, ranks - 1, axis=1) + _penalty(ranks, spec)
    if spec.randomized:
        if u is None:
            raise ValueError("randomised scores need u, one uniform draw per row")
        scores = scores - np.asarray(u, dtype=np.float64).reshape(-1, 1) * p
    return scores


def conformity_scores(
    probabilities: np.ndarray, labels: np.ndarray, spec: ConformalSpec, u: np.ndarray | None = None
) -> np.ndarray:
    """``s(x_i, y_i)`` of labelled rows (the calibration scores), ``(n,)``."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1, 1)
    return np.take_along_axis(score_matrix(probabilities, spec, u), y, axis=1)[:, 0]


# ------------------------------------------------------------------------------------------- quantiles


def quantile_rank(n: int, alpha: float) -> int:
    """``k = ceil((n + 1)(1 - alpha))``, with a guard against round-off: ``(n + 1)(1 - alpha)`` that is an
    integer in exact arithmetic (n = 9, alpha = 0.1) must not become that integer + 1 through a float
    product of 9.000000000000002."""
    exact = (n + 1) * (1.0 - alpha)
    return math.ceil(exact - 1e-9 * max(1.0, exact))


def conformal_quantile(scores: np.ndarray, alpha: float, *, what: str = "the calibration rows") -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``scores``; InvalidParameter when ``n`` is too small
    for ``alpha`` (the threshold would be infinite)."""
    n = int(np.asarray(scores).size)
    k = quantile_rank(n, alpha)
    if k > n:
        needed = quantile_rank_minimum(alpha)
        raise InvalidParameter(
            f"conformal: {what} hold {n} rows; alpha={alpha:g} needs at least {needed} "
            f"(ceil((n+1)(1-alpha)) <= n), or a larger alpha",
            field="conformal.alpha",
        )
    return float(np.partition(np.asarray(scores, dtype=np.float64), k - 1)[k - 1])


def quantile_rank_minimum(alpha: float) -> int:
    """Smallest ``n`` with ``ceil((n + 1)(1 - alpha)) <= n``."""
    n = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while quantile_rank(n, alpha) > n:
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class ConformalThresholds:
    """A fitted conformal predictor's thresholds: one (marginal) or one per class (Mondrian)."""

    spec: ConformalSpec
    threshold: float | None
    thresholds: tuple[float, ...] | None
    n: int
    n_per_class: tuple[int, ...]

    def per_class(self, n_classes: int) -> np.ndarray:
        if self.thresholds is not None:
            return np.asarray(self.thresholds, dtype=np.float64)
        return np.full(n_classes, self.threshold, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "threshold": self.threshold,
            "thresholds": list(self.thresholds) if self.thresholds is not None else None,
            "n": self.n,
            "n_per_class": list(self.n_per_class),
            "quantile": QUANTILE_RULE,
            "tolerance": TOLERANCE,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], n_classes: int) -> ConformalThresholds:
        """Rebuild from a document's ``conformal`` block, checked (InvalidParameter)."""
        spec = conformal_spec(
            {key: document.get(key) for key in _SPEC_KEYS if document.get(key) is not None},
        )

        def finite(value: Any, name: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidParameter(
                    f"conformal.{name} must be a finite number, got {value!r}", field=f"conformal.{name}"
                )
            return float(value)

        threshold = thresholds = None
        if spec.mondrian:
            values = document.get("thresholds")
            if not isinstance(values, list) or len(values) != n_classes:
                raise InvalidParameter(
                    f"conformal.thresholds must list one threshold per class ({n_classes})",
                    field="conformal.thresholds",
                )
            thresholds = tuple(finite(value, "thresholds") for value in values)
        else:
            threshold = finite(document.get("threshold"), "threshold")
        n_per_class = document.get("n_per_class") or []
        return cls(
            spec, threshold, thresholds, int(document.get("n") or 0), tuple(int(v) for v in n_per_class)
        )


def fit_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    spec: ConformalSpec,
    *,
    rng: np.random.Generator | None = None,
    u: np.ndarray | None = None,
) -> ConformalThresholds:
    """Fit the threshold (or one per class, Mondrian) on labelled calibration rows.

    Parameters
    ----------
    probabilities : (n, K) calibrated probabilities of the calibration rows.
    labels : (n,) their classes.
    spec : the score, ``alpha`` and mode.
    rng, u : randomised scores draw ``u`` from ``rng`` (or take ``u`` as given, one per row).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, n_classes = p.shape
    if spec.randomized and u is None:
        u = (rng or np.random.default_rng(0)).uniform(size=n)
    scores = conformity_scores(p, y, spec, u)
    counts = np.bincount(y, minlength=n_classes)
    if not spec.mondrian:
        return ConformalThresholds(
            spec, conformal_quantile(scores, spec.alpha), None, n, tuple(counts.tolist())
        )
    thresholds = tuple(
        conformal_quantile(scores[y == k], spec.alpha, what=f"class {k}'s calibration rows (mondrian)")
        for k in range(n_classes)
    )
    return ConformalThresholds(spec, None, thresholds, n, tuple(counts.tolist()))


# ------------------------------------------------------------------------------------------------ sets


def prediction_sets(
    probabilities: np.ndarray,
    fitted: ConformalThresholds,
    *,
    rng: np.random.Generator | None = None,
    u: np.ndarray | None = None,
) -> np.ndarray:
    """The prediction sets of ``probabilities`` as an ``(n, K)`` boolean matrix (row i's set: the columns
    that hold). Randomised sets draw ``u`` (one per row) from ``rng`` unless given."""
    p = np.asarray(probabilities, dtype=np.float64)
    spec = fitted.spec
    if spec.randomized and u is None:
        u = (rng or np.random.default_rng()).uniform(size=p.shape[0])
    if spec.score == "lac":
        return score_matrix(p, spec, u) - fitted.per_class(p.shape[1])[None, :] <= TOLERANCE
    # APS/RAPS in sorted order (one argsort, no inverse permutation to gather through), the same float
    # operations as score_matrix, then the answer scattered back to the columns.
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1)
    positions = np.arange(1, p.shape[1] + 1)[None, :]
    q = fitted.threshold if fitted.thresholds is None else np.asarray(fitted.thresholds)[order]
    through = np.cumsum(ranked, axis=1) + _penalty(positions, spec)
    if spec.randomized:
        included = (through - np.asarray(u, dtype=np.float64).reshape(-1, 1) * ranked) - q <= TOLERANCE
    else:
        # each class in order of probability up to the first whose regularised cumulative mass reaches its
        # threshold: a class is in when the mass *before* it is still below its threshold
        before = through - ranked
        if spec.score == "raps" and spec.lam:
            before = before - spec.lam * (positions > spec.k_reg)  # the penalty of the rank before
        included = (positions == 1) | (before - q < -TOLERANCE)
    sets = np.empty_like(included)
    np.put_along_axis(sets, order, included, axis=1)
    return sets


def set_lists(sets: np.ndarray) -> list[list[int]]:
    """Each row's set as its sorted class indices."""
    return [np.flatnonzero(row).tolist() for row in sets]


# ---------------------------------------------------------------------------------------------- figures


def coverage_figures(sets: np.ndarray, labels: np.ndarray, alpha: float) -> dict[str, Any]:
    """Empirical figures of prediction sets on labelled rows.

    ``coverage`` (share of rows whose class is in its set), ``coverage_per_class`` (the same among the rows
    of each class; null for a class without rows), ``mean_set_size``, ``set_size_counts`` (rows with a set of
    0, 1, ..., K classes), ``empty_sets`` (share of empty sets), ``size_stratified_coverage`` (coverage of
    the rows of each set size that occurs, with their count: Angelopoulos et al. 2021's check that small sets
    are not the ones that miss), ``worst_class_coverage`` and ``target`` ``1 - alpha``.
    """
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    n, n_classes = sets.shape
    covered = sets[np.arange(n), y]
    sizes = sets.sum(axis=1)
    per_class_n = np.bincount(y, minlength=n_classes)
    per_class_hits = np.bincount(y, weights=covered, minlength=n_classes)
    per_class = [
        float(per_class_hits[k] / per_class_n[k]) if per_class_n[k] else None for k in range(n_classes)
    ]
    size_counts = np.bincount(sizes, minlength=n_classes + 1)
    size_hits = np.bincount(sizes, weights=covered, minlength=n_classes + 1)
    stratified = [
        {"size": size, "n": int(size_counts[size]), "coverage": float(size_hits[size] / size_counts[size])}
        for size in np.flatnonzero(size_counts).tolist()
    ]
    observed = [value for value in per_class if value is not None]
    return {
        "alpha": float(alpha),
        "target": 1.0 - float(alpha),
        "n": int(n),
        "coverage": float(covered.mean()),
        "coverage_per_class": per_class,
        "worst_class_coverage": min(observed) if observed else None,
        "mean_set_size": float(sizes.mean()),
        "median_set_size": float(np.median(sizes)),
        "empty_sets": float((sizes == 0).mean()),
        "set_size_counts": size_counts.tolist(),
        "size_stratified_coverage": stratified,
    }
