"""Calibration metrics: ECE and its variants, MCE, Brier score, NLL, accuracy, reliability bins, bootstrap.

Every public function takes ``(probabilities, labels)`` first, with ``from_logits=True`` to pass logits
instead, and ``sample_weight`` last. Inputs are validated by :mod:`service.core.validation` (numpy arrays of
float32 or float64, nested lists, or torch tensors); the numerics then run in private helpers on plain
arrays. A single score column is a binary model (the probability or logit of class 1) and is expanded to
two columns first, so that every definition below sees full probability rows.

Conventions
-----------
Confidence binning, ``M = n_bins``:

- ``binning="width"`` (default): bin ``i`` holds the confidences in ``(i/M, (i+1)/M]``; a confidence of
  exactly 0 goes to bin 0 and exactly 1 to bin ``M - 1``. The edges are compared in the confidences' own
  precision (``float32(i/M)`` for float32 scores), so a confidence equal to an edge always falls in the bin
  below it.
- ``binning="mass"``: equal-mass bins. The inner edges are the ``j/M`` quantiles of the confidences
  (inverted-CDF definition, weighted by ``sample_weight``: the smallest confidence whose cumulative weight
  reaches ``j/M`` of the total), and bins are closed on the right like the width bins: bin 0 is
  ``[0, e_1]``, bin ``j`` is ``(e_j, e_{j+1}]``. Ties stay together: equal confidences always share a bin,
  so with many ties some bins hold more than ``N/M`` samples and others are empty. Without ties and with
  ``N`` a multiple of ``M``, every bin holds exactly ``N/M`` samples, and the partition is the one of
  ``sklearn.calibration.calibration_curve(strategy="quantile")``.

What is binned (``kind``):

- ``"top_label"`` (default): the largest probability against the accuracy of the argmax prediction (ties
  in the argmax go to the lowest class index, as ``numpy.argmax`` does).
- ``"classwise"``: for each class ``k``, ``p_k`` against ``1[y = k]``, each class binned on its own; the
  result is the mean over classes of the per-class error (Kull et al. 2019, Nixon et al. 2019).
- ``"positive_class"``: binary models only, ``p_1`` against ``y`` (as ``torchmetrics``'
  ``binary_calibration_error`` and ``sklearn.calibration.calibration_curve`` do).

With bin weights ``w_b`` (the share of the total sample weight in bin ``b``), mean confidence ``conf_b``
and accuracy (observed frequency) ``acc_b``, and ``gap_b = |acc_b - conf_b|``:

- ``norm="l1"`` (ECE): ``sum_b w_b gap_b``;
- ``norm="l2"``: ``sqrt(sum_b w_b gap_b^2)``;
- ``norm="max"`` (MCE): ``max_b gap_b`` over the non-empty bins (bins with positive weight).

Sums are accumulated in float64 whatever the input precision.

References
----------
.. [1] Naeini, Cooper, Hauskrecht (2015). "Obtaining well calibrated probabilities using Bayesian
       binning." AAAI.
.. [2] Guo, Pleiss, Sun, Weinberger (2017). "On calibration of modern neural networks." ICML.
.. [3] Kumar, Liang, Ma (2019). "Verified uncertainty calibration." NeurIPS.
.. [4] Kull et al. (2019). "Beyond temperature scaling: obtaining well-calibrated multi-class
       probabilities with Dirichlet calibration." NeurIPS.
.. [5] Nixon et al. (2019). "Measuring calibration in deep learning." CVPR workshops.
.. [6] Brier (1950). "Verification of forecasts expressed in terms of probability." Monthly Weather Review.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from service.core import calibration_tests, cancellation, ece_conventions, smooth_calibration
from service.core.probability import softmax, two_column_logits, two_column_probabilities
from service.core.validation import (
    ARGMAX_MIN_COLUMNS,
    check_choice,
    check_labelled,
    check_labels,
    check_positive_int,
    check_probabilities_top_label,
    check_sample_weight,
    check_work,
    scan_narrow,
)
from service.errors import InvalidInput

__all__ = [
    "BINNINGS",
    "FIT_FIGURES",
    "KINDS",
    "NORMS",
    "BootstrapInterval",
    "ReliabilityBins",
    "accuracy",
    "bca_levels",
    "bootstrap_interval",
    "brier_score",
    "calibration_report",
    "calibration_report_checked",
    "check_binning",
    "check_bootstrap",
    "check_ece_convention",
    "check_nll_clip",
    "default_interval_method",
    "expected_calibration_error",
    "fit_figures",
    "fit_figures_of_probabilities",
    "infinite_nll_rows",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "nll_convention",
    "overconfidence_error",
    "per_class_calibration_tests",
    "reliability_bins",
    "smooth_reliability",
    "underconfidence_error",
]

BINNINGS = ("width", "mass")
KINDS = ("top_label", "classwise", "positive_class")
NORMS = ("l1", "l2", "max")
DEFAULT_N_BINS = 15
MAX_N_BINS = 10_000
"""Most bins of ECE, MCE and reliability figures (``n_bins``; HTTP ``n_bins``, CLI ``--bins``). Each binned
figure keeps a few float64 arrays of ``n_bins`` (top-label) or ``K x n_bins`` (classwise) entries; at
10,000 bins a top-label figure is ~0.5 MB, and far more bins than samples only leaves bins empty. 1e8 bins
(~4 GB of bin arrays) killed the CLI."""
MAX_CLASSWISE_BINS = 10_000_000
"""Most bins of a classwise figure, ``K x n_bins`` (every report computes ``ece_classwise``): six float64 or
intp arrays of that length are ~480 MB at the limit (K = 666,666 columns at 15 bins)."""
MAX_BOOTSTRAP_RESAMPLES = 10_000
"""Most bootstrap resamples (``n_resamples``; HTTP ``bootstrap``, CLI ``--bootstrap``)."""
MAX_BOOTSTRAP_WORK = 10_000_000
"""Most ``n_resamples x n_samples`` of one bootstrap interval. A resample costs about 0.05 us per row and
figure on these machines, and an evaluation draws intervals of five figures (twice with a calibrator): at
the limit about 2.5 s of CPU per group (10,000 resamples of 3,600 rows, 3.6e7, cost 9 s). 1,000 resamples
of 10,000 rows is the largest that fits."""

# Elements per chunk of the binning loops' reused buffers (256 KiB of float32: well inside L2).
_CHUNK = 1 << 16
# Rows per block of the transposed softmax of narrow logits.
_NARROW_ROWS = 1 << 14


# ----------------------------------------------------------------------------------------- shared inputs


class _Scores:
    """Validated scores and labels, with the derived arrays the metrics share, each computed once.

    ``probabilities`` always has two or more columns (float32 or float64 as given; float64 from logits).
    """

    def __init__(
        self,
        probabilities: np.ndarray,
        labels: np.ndarray,
        logits: np.ndarray | None = None,
        predictions: np.ndarray | None = None,
        maxima: np.ndarray | None = None,
        probability_floor: float | None = None,
    ):
        self.probabilities = probabilities
        self.labels = labels
        self.logits = logits
        self.probability_floor = probability_floor
        # each row's argmax and maximum, where validation already computed them
        self._predictions = predictions
        self._maxima = maxima
        self._bin_ids: dict[tuple[str, int], np.ndarray] = {}

    @property
    def n_samples(self) -> int:
        return self.probabilities.shape[0]

    @property
    def n_classes(self) -> int:
        return self.probabilities.shape[1]

    @cached_property
    def _top_label(self) -> tuple[np.ndarray, np.ndarray]:
        if self._predictions is not None and self._maxima is not None:
            return self._predictions, self._maxima
        if self._predictions is not None:
            rows = self._predictions[:, None]
            return self._predictions, np.take_along_axis(self.probabilities, rows, axis=1)[:, 0]
        return _top_label(self.probabilities)

    @property
    def predictions(self) -> np.ndarray:
        return self._top_label[0]

    @property
    def confidences(self) -> np.ndarray:
        """Largest probability of each row, in the input precision."""
        return self._top_label[1]

    @cached_property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    @cached_property
    def true_class_probability(self) -> np.ndarray:
        rows = np.arange(self.n_samples)
        return self.probabilities[rows, self.labels].astype(np.float64)

    @cached_property
    def true_class_log_probability(self) -> np.ndarray:
        if self.logits is not None:
            # log p_y = (z_y - z_j) + log p_j for any class j; with j the argmax, p_j >= 1/K never
            # underflows, so this is as exact as log_softmax without its second N x K pass of exp.
            logits = two_column_logits(self.logits)
            rows = np.arange(self.n_samples)
            true_logit = logits[rows, self.labels].astype(np.float64)
            top_logit = logits[rows, self.predictions].astype(np.float64)
            return (true_logit - top_logit) + np.log(self.confidences)
        if self.probability_floor is not None:
            return np.log(np.maximum(self.true_class_probability, self.probability_floor))
        with np.errstate(divide="ignore"):  # p = 0 gives -inf on purpose: the exact NLL is infinite
            return np.log(self.true_class_probability)

    def binned_pair(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(confidences, outcomes)`` for a one-dimensional ``kind``."""
        if kind == "top_label":
            return self.confidences, self.correct
        if self.n_classes != 2:
            raise InvalidInput(
                f'kind="positive_class" needs a binary model (1 or 2 score columns), got {self.n_classes}',
                field="kind",
            )
        return self.probabilities[:, 1], self.labels == 1

    def width_bin_ids(self, kind: str, n_bins: int) -> np.ndarray:
        """Equal-width bin of every confidence (cached: they depend on neither weights nor norm)."""
        key = (kind, n_bins)
        if key not in self._bin_ids:
            if kind == "classwise":
                self._bin_ids[key] = _classwise_flat_ids(_width_bin_ids(self.probabilities, n_bins), n_bins)
            else:
                self._bin_ids[key] = _width_bin_ids(self.binned_pair(kind)[0], n_bins)
        return self._bin_ids[key]


def _prepare(
    probabilities: Any, labels: Any, *, from_logits: bool, sample_weight: Any
) -> tuple[_Scores, np.ndarray | None]:
    if from_logits:
        scores, y, weights = check_labelled(
            probabilities, labels, from_logits=True, sample_weight=sample_weight
        )
        return _Scores(softmax(scores), y, logits=scores), weights
    # The argmax (and for narrow rows the maximum) comes from the validation's own pass over the matrix.
    scores, predictions, maxima = check_probabilities_top_label(probabilities)
    y = check_labels(labels, scores.shape[0], scores.shape[1])
    weights = check_sample_weight(sample_weight, scores.shape[0])
    return _Scores(two_column_probabilities(scores), y, predictions=predictions, maxima=maxima), weights


def _top_label(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(argmax, max)`` of each row, ties to the lowest index, without a float64 copy of the matrix."""
    n_classes = probabilities.shape[1]
    if n_classes == 2:
        first, second = probabilities[:, 0], probabilities[:, 1]
        second_wins = second > first
        return second_wins.astype(np.intp), np.where(second_wins, second, first)
    if n_classes < ARGMAX_MIN_COLUMNS:
        _, maxima, argmax, _ = scan_narrow(probabilities)
        return argmax, maxima
    predictions = probabilities.argmax(axis=1)
    return predictions, np.take_along_axis(probabilities, predictions[:, None], axis=1)[:, 0]


def _softmax_top_label(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(softmax(logits) in float64, argmax, max)`` of each row; argmax and max None for wide rows.

    The softmax of :func:`service.core.probability.softmax` (up to the order of each row's sum). For
    narrow rows the work runs on cache-sized blocks transposed into reused buffers, as in
    :func:`service.core.validation.scan_narrow`: along rows of a few elements numpy pays its set-up per row
    (1M x 10: softmax 220 ms as whole-matrix passes), and the top label falls out of the same blocks.
    """
    z = two_column_logits(logits)
    n_samples, n_classes = z.shape
    out = np.empty((n_samples, n_classes))
    if n_classes >= ARGMAX_MIN_COLUMNS:
        # wide rows: in place in the answer, block by block (50k x 1000: whole-matrix temporaries of
        # 400 MB each made softmax 2.5 s)
        rows = max(1, _CHUNK // n_classes)
        row_values = np.empty((min(rows, n_samples), 1))
        for start in range(0, n_samples, rows):
            block = out[start : start + rows]
            values = row_values[: block.shape[0]]
            np.copyto(block, z[start : start + rows])
            np.maximum.reduce(block, axis=1, out=values[:, 0])
            block -= values
            np.exp(block, out=block)
            np.add.reduce(block, axis=1, out=values[:, 0])
            block /= values
        return out, None, None
    rows = min(n_samples, _NARROW_ROWS)
    columns = np.empty((n_classes, rows))
    row_values = np.empty(rows)
    is_max = np.empty((n_classes, rows), dtype=np.uint8)
    weights = np.arange(n_classes, 0, -1, dtype=np.uint8)[:, None]
    maxima = np.empty(n_samples)
    argmax = np.empty(n_samples, dtype=np.uint8)
    for start in range(0, n_samples, rows):
        width = min(rows, n_samples - start)
        block, values, block_is_max = columns[:, :width], row_values[:width], is_max[:, :width]
        part = slice(start, start + width)
        np.copyto(block, z[part].T)
        np.maximum.reduce(block, axis=0, out=values)
        block -= values
        np.exp(block, out=block)
        np.add.reduce(block, axis=0, out=values)
        block /= values
        out[part] = block.T
        np.maximum.reduce(block, axis=0, out=maxima[part])
        np.equal(block, maxima[part], out=block_is_max.view(np.bool_))
        np.multiply(block_is_max, weights, out=block_is_max)
        np.maximum.reduce(block_is_max, axis=0, out=argmax[part])
    np.subtract(n_classes, argmax, out=argmax)
    return out, argmax, maxima


# --------------------------------------------------------------------------------------------- binning


def _width_edges(n_bins: int) -> np.ndarray:
    return np.arange(n_bins + 1) / n_bins


def _width_bin_ids(confidences: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``i`` such that ``e_i < c <= e_{i+1}`` (``c = 0`` in bin 0), ``e_i = i/M`` in ``c``'s dtype.

    The same as ``max(searchsorted(edges, c, side="left") - 1, 0)``, several times faster: ``ceil(c M) - 1``
    is exact except where ``c M`` lies within rounding error of an integer, i.e. next to an edge; only
    those confidences (other than the exact 0 and 1, which ``ceil`` gets right) are searched. The work runs
    in chunks through two small reused buffers: fresh N-sized temporaries cost more in page faults than the
    arithmetic (1M float32: 12 ms with four temporaries, against ~3 ms chunked).
    """
    dtype = confidences.dtype
    values = confidences.ravel()
    ids = np.empty(values.shape, dtype=np.intp)
    chunk = min(values.size, _CHUNK)
    scaled, rounded = np.empty(chunk, dtype=dtype), np.empty(chunk, dtype=dtype)
    # c M and the edge i/M are each rounded by at most half an ulp (scaled by M): 4 M eps is ample
    tolerance = dtype.type(4 * n_bins * np.finfo(dtype).eps)
    near_edge = []
    for start in range(0, values.size, chunk):
        part = values[start : start + chunk]
        part_scaled, part_rounded = scaled[: part.size], rounded[: part.size]
        np.multiply(part, dtype.type(n_bins), out=part_scaled)
        np.ceil(part_scaled, out=part_rounded)
        part_rounded -= 1
        np.maximum(part_rounded, 0, out=part_rounded)
        np.copyto(ids[start : start + chunk], part_rounded, casting="unsafe")
        np.rint(part_scaled, out=part_rounded)
        np.subtract(part_scaled, part_rounded, out=part_rounded)
        np.abs(part_rounded, out=part_rounded)
        near = np.flatnonzero(part_rounded <= tolerance)
        if near.size:
            near_edge.append(near + start)
    if near_edge:
        positions = np.concatenate(near_edge)
        near_values = values[positions]
        inside = (near_values != 0) & (near_values != 1)
        positions, near_values = positions[inside], near_values[inside]
        edges = _width_edges(n_bins).astype(dtype)
        ids[positions] = np.maximum(np.searchsorted(edges, near_values, side="left") - 1, 0)
    return ids.reshape(confidences.shape)


def _mass_bin_ids(
    confidences: np.ndarray, n_bins: int, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Equal-mass bin ids of a 1-D array and the bin edges ``[0, e_1, ..., e_{M-1}, 1]`` (float64)."""
    n_samples = confidences.shape[0]
    quantiles = np.arange(1, n_bins)
    if n_bins == 1:
        inner = confidences[:0]
    elif weights is None:
        # ceil(j N / M) - 1 in exact integer arithmetic: the inverted-CDF j/M quantile's rank
        ranks = -((-quantiles * n_samples) // n_bins) - 1
        inner = np.partition(confidences, ranks)[ranks]
    else:
        order = np.argsort(confidences, kind="stable")
        cumulative = np.cumsum(weights[order])
        targets = quantiles * cumulative[-1] / n_bins
        positions = np.minimum(np.searchsorted(cumulative, targets, side="left"), n_samples - 1)
        inner = confidences[order[positions]]
    ids = np.searchsorted(inner, confidences, side="left")
    edges = np.concatenate([[0.0], inner.astype(np.float64), [1.0]])
    return ids, edges


@dataclass(frozen=True, eq=False)
class _BinSums:
    """Per-bin float64 sums, shape ``(groups, M)``: one group, or one per class for ``classwise``."""

    mass: np.ndarray  # total sample weight (the sample count when unweighted)
    confidence: np.ndarray  # weighted sum of confidences
    outcome: np.ndarray  # weighted sum of outcomes (correct / y == k / y == 1)
    counts: np.ndarray  # number of samples (rows), whatever their weight
    edges: np.ndarray  # (groups, M + 1)

    @property
    def total(self) -> np.ndarray:
        return self.mass.sum(axis=1)


def _bin_sums(
    bin_ids: np.ndarray,
    confidences: np.ndarray,
    outcomes: np.ndarray,
    weights: np.ndarray | None,
    n_bins_total: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(mass, confidence sum, outcome sum, counts)`` per bin from 1-D arrays (bincount sums in float64).

    ``outcomes`` are booleans. Unweighted, counts and outcome sums come from one integer bincount of
    ``2 id + outcome``, and everything runs in chunks: bincount's weights are float64, so a whole float32
    or boolean array would first be copied into a fresh N-sized float64 array (page faults included, the
    copies cost more than the counting).
    """
    mass: np.ndarray  # numpy's stubs type every bincount as integer, weighted ones included
    if weights is not None:
        counts = np.bincount(bin_ids, minlength=n_bins_total)
        mass = np.bincount(bin_ids, weights=weights, minlength=n_bins_total)
        confidence = np.bincount(bin_ids, weights=weights * confidences, minlength=n_bins_total)
        outcome = np.bincount(bin_ids, weights=weights * outcomes, minlength=n_bins_total)
        return mass, confidence, outcome, counts
    chunk = min(bin_ids.size, _CHUNK)
    paired = np.zeros(2 * n_bins_total, dtype=np.intp)
    confidence = np.zeros(n_bins_total)
    paired_ids = np.empty(chunk, dtype=np.intp)
    for start in range(0, bin_ids.size, chunk):
        part = slice(start, start + chunk)
        part_ids, part_paired = bin_ids[part], paired_ids[: min(chunk, bin_ids.size - start)]
        np.multiply(part_ids, 2, out=part_paired)
        part_paired += outcomes[part]
        paired += np.bincount(part_paired, minlength=2 * n_bins_total)
        confidence += np.bincount(part_ids, weights=confidences[part], minlength=n_bins_total)
    counts = paired[0::2] + paired[1::2]
    return counts.astype(np.float64), confidence, paired[1::2].astype(np.float64), counts


def _binned(scores: _Scores, weights: np.ndarray | None, *, kind: str, binning: str, n_bins: int) -> _BinSums:
    if kind == "classwise":
        return _binned_classwise(scores, weights, binning=binning, n_bins=n_bins)
    confidences, outcomes = scores.binned_pair(kind)
    if binning == "width":
        ids = scores.width_bin_ids(kind, n_bins)
        edges = _width_edges(n_bins)
    else:
        ids, edges = _mass_bin_ids(confidences, n_bins, weights)
    mass, confidence, outcome, counts = _bin_sums(ids, confidences, outcomes, weights, n_bins)
    return _BinSums(
        mass=mass[None, :],
        confidence=confidence[None, :],
        outcome=outcome[None, :],
        counts=counts[None, :],
        edges=edges[None, :],
    )


def _classwise_flat_ids(ids: np.ndarray, n_bins: int) -> np.ndarray:
    """Give class ``k``'s bins the ids ``k M .. k M + M - 1`` (in place) and flatten row-major."""
    ids += np.arange(ids.shape[1]) * n_bins
    return ids.ravel()


def _binned_classwise(scores: _Scores, weights: np.ndarray | None, *, binning: str, n_bins: int) -> _BinSums:
    probabilities, labels = scores.probabilities, scores.labels
    n_samples, n_classes = probabilities.shape
    check_work(n_classes * n_bins, MAX_CLASSWISE_BINS, "n_bins", "classwise bins (classes x n_bins)")
    if binning == "width" and weights is None and ("classwise", n_bins) not in scores._bin_ids:
        return _binned_classwise_width(probabilities, labels, n_bins)
    if binning == "width":
        flat_ids = scores.width_bin_ids("classwise", n_bins)
        edges = np.broadcast_to(_width_edges(n_bins), (n_classes, n_bins + 1))
    else:
        ids = np.empty(probabilities.shape, dtype=np.intp)
        edges = np.empty((n_classes, n_bins + 1))
        for k in range(n_classes):  # per class: each column has its own quantiles
            ids[:, k], edges[k] = _mass_bin_ids(probabilities[:, k], n_bins, weights)
        flat_ids = _classwise_flat_ids(ids, n_bins)
    n_bins_total = n_classes * n_bins
    # the outcome 1[y = k] is 1 only at the label's entry: bin those N entries, not all N x K
    label_ids = flat_ids[np.arange(n_samples) * n_classes + labels]
    mass: np.ndarray
    outcome: np.ndarray
    counts = np.bincount(flat_ids, minlength=n_bins_total)
    if weights is None:
        mass = counts.astype(np.float64)
        confidence = np.bincount(flat_ids, weights=probabilities.ravel(), minlength=n_bins_total)
        outcome = np.bincount(label_ids, minlength=n_bins_total).astype(np.float64)
    else:
        mass = np.bincount(flat_ids, weights=np.repeat(weights, n_classes), minlength=n_bins_total)
        weighted = (probabilities * weights[:, None]).ravel()
        confidence = np.bincount(flat_ids, weights=weighted, minlength=n_bins_total)
        outcome = np.bincount(label_ids, weights=weights, minlength=n_bins_total)
    shape = (n_classes, n_bins)
    return _BinSums(
        mass=mass.reshape(shape),
        confidence=confidence.reshape(shape),
        outcome=outcome.reshape(shape),
        counts=counts.reshape(shape),
        edges=np.asarray(edges),
    )


def _binned_classwise_width(probabilities: np.ndarray, labels: np.ndarray, n_bins: int) -> _BinSums:
    """Unweighted classwise sums on equal-width bins, in row chunks: no N x K array of bin ids (1M x 10:
    80 MB written and read three times over) and each chunk's ids stay in cache for the three bincounts."""
    n_samples, n_classes = probabilities.shape
    n_bins_total = n_classes * n_bins
    offsets = np.arange(n_classes) * n_bins
    counts = np.zeros(n_bins_total, dtype=np.intp)
    confidence = np.zeros(n_bins_total)
    outcome = np.zeros(n_bins_total, dtype=np.intp)
    rows = max(1, _CHUNK // n_classes)
    for start in range(0, n_samples, rows):
        part = slice(start, start + rows)
        chunk = probabilities[part]
        ids = _width_bin_ids(chunk, n_bins)
        ids += offsets
        flat = ids.ravel()
        counts += np.bincount(flat, minlength=n_bins_total)
        confidence += np.bincount(flat, weights=chunk.ravel(), minlength=n_bins_total)
        # the outcome 1[y = k] is 1 only at the label's entry
        outcome += np.bincount(ids[np.arange(chunk.shape[0]), labels[part]], minlength=n_bins_total)
    shape = (n_classes, n_bins)
    return _BinSums(
        mass=counts.astype(np.float64).reshape(shape),
        confidence=confidence.reshape(shape),
        outcome=outcome.astype(np.float64).reshape(shape),
        counts=counts.reshape(shape),
        edges=np.asarray(np.broadcast_to(_width_edges(n_bins), (n_classes, n_bins + 1))),
    )


# ----------------------------------------------------------------------------------- error from bin sums


def _bin_means(sums: _BinSums) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(non-empty mask, mean confidence, accuracy)``; the means are 0 in empty bins."""
    nonempty = sums.mass > 0
    mean_confidence = np.divide(sums.confidence, sums.mass, out=np.zeros_like(sums.mass), where=nonempty)
    accuracy = np.divide(sums.outcome, sums.mass, out=np.zeros_like(sums.mass), where=nonempty)
    return nonempty, mean_confidence, accuracy


def _calibration_errors(sums: _BinSums, *, norm: str, debiased: bool) -> np.ndarray:
    """Calibration error of each group (row of the sums), shape ``(groups,)``."""
    difference = sums.confidence - sums.outcome  # = mass_b * (conf_b - acc_b)
    total = sums.total
    if norm == "l1":
        return np.abs(difference).sum(axis=1) / total
    _, mean_confidence, accuracy = _bin_means(sums)
    gap = np.abs(mean_confidence - accuracy)
    if norm == "max":
        return gap.max(axis=1)  # empty bins have gap 0, which never exceeds a real gap
    if not debiased:
        return np.sqrt((sums.mass * gap**2).sum(axis=1) / total)
    # Kumar et al. (2019), unbiased_square_ce: each bin with n_b >= 2 contributes
    # w_b (gap_b^2 - acc_b (1 - acc_b) / (n_b - 1)), others nothing; the L2 estimate is sqrt(max(sum, 0)).
    enough = sums.mass >= 2
    variance = np.divide(
        accuracy * (1.0 - accuracy), sums.mass - 1.0, out=np.zeros_like(sums.mass), where=enough
    )
    squared = np.where(enough, sums.mass * (gap**2 - variance), 0.0).sum(axis=1) / total
    return np.sqrt(np.maximum(squared, 0.0))


def _error_parts(sums: _BinSums) -> tuple[np.ndarray, np.ndarray]:
    """Per group: (overconfidence, underconfidence) = (sum w_b max(conf_b - acc_b, 0), ... acc_b - conf_b)."""
    difference = sums.confidence - sums.outcome
    total = sums.total
    over = np.maximum(difference, 0.0).sum(axis=1) / total
    under = np.maximum(-difference, 0.0).sum(axis=1) / total
    return over, under


# ---------------------------------------------------------------------------------- options and compute


def _binning_options(
    n_bins: Any = DEFAULT_N_BINS, binning: Any = "width", kind: Any = "top_label"
) -> dict[str, Any]:
    return {
        "n_bins": check_positive_int(n_bins, "n_bins", maximum=MAX_N_BINS),
        "binning": check_choice(binning, "binning", BINNINGS),
        "kind": check_choice(kind, "kind", KINDS),
    }


def check_binning(n_bins: Any, binning: Any, n_classes: int) -> None:
    """The binning options of a report on ``n_classes`` columns, against ``MAX_N_BINS`` and
    ``MAX_CLASSWISE_BINS``, before any figure is computed; InvalidInput naming the limit."""
    n_bins = _binning_options(n_bins, binning)["n_bins"]
    classes = max(n_classes, 2)
    check_work(classes * n_bins, MAX_CLASSWISE_BINS, "n_bins", "classwise bins (classes x n_bins)")


def _ece_options(
    n_bins: Any = DEFAULT_N_BINS,
    binning: Any = "width",
    kind: Any = "top_label",
    norm: Any = None,
    debiased: Any = False,
) -> dict[str, Any]:
    options = _binning_options(n_bins, binning, kind)
    if not isinstance(debiased, bool | np.bool_):
        raise InvalidInput(f"debiased must be true or false, got {debiased!r}", field="debiased")
    if norm is None:
        norm = "l2" if debiased else "l1"
    norm = check_choice(norm, "norm", NORMS)
    if debiased and norm != "l2":
        raise InvalidInput(
            f"debiased=True is the debiased estimator of the L2 calibration error (Kumar et al. 2019); "
            f"use norm='l2' or leave norm unset, not {norm!r}",
            field="debiased",
        )
    return {**options, "norm": norm, "debiased": bool(debiased)}


def _mce_options(
    n_bins: Any = DEFAULT_N_BINS, binning: Any = "width", kind: Any = "top_label"
) -> dict[str, Any]:
    return {**_binning_options(n_bins, binning, kind), "norm": "max", "debiased": False}


def _no_options() -> dict[str, Any]:
    return {}


def _nll_options(clip: Any = None) -> dict[str, Any]:
    if clip is not None and (
        isinstance(clip, bool)
        or not isinstance(clip, float | int | np.floating)
        or not 0.0 < float(clip) < 0.5
    ):
        raise InvalidInput(f"clip must be None or a number in (0, 0.5), got {clip!r}", field="clip")
    return {"clip": None if clip is None else float(clip)}


def check_nll_clip(clip: Any) -> float:
    """``nll_clip`` checked: a number in (0, 0.5); InvalidInput naming ``nll_clip`` otherwise."""
    try:
        return _nll_options(clip)["clip"]
    except InvalidInput as exc:
        raise InvalidInput(str(exc).replace("clip", "nll_clip", 1), field="nll_clip") from None


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    if weights is None:
        return float(np.mean(values, dtype=np.float64))
    used = weights > 0  # a zero weight must not turn an infinite loss into 0 * inf = NaN
    return float(np.dot(weights[used], values[used]) / weights[used].sum())


def _ece_compute(
    scores: _Scores,
    weights: np.ndarray | None,
    *,
    n_bins: int,
    binning: str,
    kind: str,
    norm: str,
    debiased: bool,
) -> float:
    sums = _binned(scores, weights, kind=kind, binning=binning, n_bins=n_bins)
    return float(np.mean(_calibration_errors(sums, norm=norm, debiased=debiased)))


def _overconfidence_compute(
    scores: _Scores, weights: np.ndarray | None, *, n_bins: int, binning: str, kind: str
) -> float:
    sums = _binned(scores, weights, kind=kind, binning=binning, n_bins=n_bins)
    return float(np.mean(_error_parts(sums)[0]))


def _underconfidence_compute(
    scores: _Scores, weights: np.ndarray | None, *, n_bins: int, binning: str, kind: str
) -> float:
    sums = _binned(scores, weights, kind=kind, binning=binning, n_bins=n_bins)
    return float(np.mean(_error_parts(sums)[1]))


def _brier_compute(scores: _Scores, weights: np.ndarray | None) -> float:
    probabilities, labels = scores.probabilities, scores.labels
    n_samples, n_classes = probabilities.shape
    per_row = np.empty(n_samples)
    # In row blocks through one reused float64 buffer (the labels' entries are changed in it): a float64
    # copy of the whole matrix cost more in page faults than the arithmetic (1M x 10: 290 ms against ~40).
    rows = max(1, _CHUNK // n_classes)
    buffer = np.empty((min(rows, n_samples), n_classes))
    for start in range(0, n_samples, rows):
        stop = min(start + rows, n_samples)
        difference = buffer[: stop - start]
        np.copyto(difference, probabilities[start:stop])
        difference[np.arange(stop - start), labels[start:stop]] -= 1.0
        np.einsum("ij,ij->i", difference, difference, out=per_row[start:stop])
    return _mean(per_row, weights)


def _nll_compute(scores: _Scores, weights: np.ndarray | None, *, clip: float | None) -> float:
    if clip is None:
        losses = -scores.true_class_log_probability
    elif scores.logits is None:  # the scikit-learn log_loss way: clip the probability, then log
        losses = -np.log(np.clip(scores.true_class_probability, clip, 1.0 - clip))
    else:
        losses = -np.clip(scores.true_class_log_probability, math.log(clip), math.log1p(-clip))
    return _mean(losses, weights)


def _accuracy_compute(scores: _Scores, weights: np.ndarray | None) -> float:
    return _mean(scores.correct, weights)


# ------------------------------------------------------------------------------------------ public API


def expected_calibration_error(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    kind: str = "top_label",
    norm: str | None = None,
    debiased: bool = False,
    sample_weight: Any = None,
    convention: str = "calibserve",
) -> float:
    r"""Expected calibration error (ECE) and its variants.

    .. math::

        \mathrm{ECE} = \sum_b w_b \, |\mathrm{acc}_b - \mathrm{conf}_b|, \qquad
        \mathrm{ECE}_{\ell_2} = \Big(\sum_b w_b \, (\mathrm{acc}_b - \mathrm{conf}_b)^2\Big)^{1/2}, \qquad
        \mathrm{MCE} = \max_{b:\, w_b > 0} |\mathrm{acc}_b - \mathrm{conf}_b|

    where ``w_b`` is the share of the (weighted) samples in bin ``b``. See the module docstring for the
    bin conventions.

    Parameters
    ----------
    probabilities : array-like of shape (n_samples, n_classes)
        Predicted probabilities (rows sum to 1), or logits with ``from_logits=True``. One column is a binary
        model (``P(y = 1)`` or its logit).
    labels : array-like of shape (n_samples,)
        Integer class labels in ``[0, n_classes)`` (``{0, 1}`` for one column).
    from_logits : bool, default=False
        The first argument holds logits; they go through a float64 softmax.
    n_bins : int, default=15
        Number of bins ``M``.
    binning : {"width", "mass"}, default="width"
        Equal-width bins ``(i/M, (i+1)/M]`` or equal-mass (quantile) bins.
    kind : {"top_label", "classwise", "positive_class"}, default="top_label"
        What is binned: the top-label confidence, each class's probability (result averaged over the
        classes), or the probability of class 1 of a binary model.
    norm : {"l1", "l2", "max"} or None, default=None
        ``"l1"`` unless ``debiased=True``, which needs (and defaults to) ``"l2"``.
    debiased : bool, default=False
        The debiased estimator of the squared L2 error (Kumar et al. 2019, ``unbiased_square_ce`` in
        p-lambda/verified_calibration): each bin with ``n_b >= 2`` contributes
        ``w_b (gap_b^2 - acc_b (1 - acc_b) / (n_b - 1))``, bins with fewer samples contribute nothing, and
        the result is ``sqrt(max(sum, 0))``. With weights, ``n_b`` is the bin's total weight (frequency
        weights). For ``kind="classwise"`` the per-class estimates are averaged, as every classwise error
        here is (Kumar et al. take the root-mean-square over classes instead).
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weights; integer weights count like repeated rows.
    convention : {"calibserve", "torchmetrics", "sklearn", "netcal", "guo2017", "kumar2019"}
        ``"calibserve"`` (default): the conventions above. The others reproduce another library's number on
        the same data (:mod:`service.core.ece_conventions` says how each bins; docs/ece-conventions.md shows
        where they differ): they take ``n_bins`` and ``kind`` (``top_label`` or ``positive_class``) and
        none of ``binning``, ``norm``, ``debiased`` or ``sample_weight``. ``"kumar2019"`` is Kumar et al.'s
        debiased L2 error on their equal-mass bins. From logits, the probabilities are calibserve's float64
        softmax (the libraries' own softmax may round a confidence across a bin edge).

    Raises
    ------
    InvalidInput
        Malformed scores, labels, weights or options; ``kind="positive_class"`` on a non-binary model.
    """
    convention = check_choice(convention, "convention", ece_conventions.CONVENTIONS)
    options = _ece_options(n_bins=n_bins, binning=binning, kind=kind, norm=norm, debiased=debiased)
    if convention != "calibserve":
        return _convention_ece(probabilities, labels, convention, options, from_logits, sample_weight)
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _ece_compute(scores, weights, **options)


def _convention_ece(
    probabilities: Any,
    labels: Any,
    convention: str,
    options: dict[str, Any],
    from_logits: bool,
    sample_weight: Any,
) -> float:
    """:func:`expected_calibration_error` under another library's convention (its binning is its own)."""
    fixed = {"binning": "width", "norm": "l1", "debiased": False}
    changed = [name for name, value in fixed.items() if options[name] != value]
    if changed or sample_weight is not None or options["kind"] == "classwise":
        given = ", ".join([*changed, *(["sample_weight"] if sample_weight is not None else [])]) or "kind"
        raise InvalidInput(
            f"the {convention} ECE convention fixes its own binning and norm and takes neither weights nor "
            f"kind='classwise'; drop {given}",
            field="convention",
        )
    scores, _ = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=None)
    if options["kind"] == "positive_class":
        scores.binned_pair("positive_class")  # the binary-model check, with its message
    return ece_conventions.convention_ece(
        scores.probabilities,
        scores.labels,
        convention=convention,
        n_bins=options["n_bins"],
        kind=options["kind"],
    )


def maximum_calibration_error(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    kind: str = "top_label",
    sample_weight: Any = None,
) -> float:
    """Maximum calibration error: the largest ``|acc_b - conf_b|`` over the non-empty bins.

    Same as ``expected_calibration_error(..., norm="max")``; for ``kind="classwise"`` the mean over classes
    of each class's MCE. Parameters as in :func:`expected_calibration_error`.
    """
    options = _mce_options(n_bins=n_bins, binning=binning, kind=kind)
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _ece_compute(scores, weights, **options)


def overconfidence_error(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    kind: str = "top_label",
    sample_weight: Any = None,
) -> float:
    """The part of the (L1) ECE from bins whose confidence exceeds their accuracy.

    ``sum_b w_b max(conf_b - acc_b, 0)``; with :func:`underconfidence_error` it adds up to the ECE.
    Parameters as in :func:`expected_calibration_error`.
    """
    options = _binning_options(n_bins, binning, kind)
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _overconfidence_compute(scores, weights, **options)


def underconfidence_error(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    kind: str = "top_label",
    sample_weight: Any = None,
) -> float:
    """The part of the (L1) ECE from bins whose accuracy exceeds their confidence.

    ``sum_b w_b max(acc_b - conf_b, 0)``; with :func:`overconfidence_error` it adds up to the ECE.
    Parameters as in :func:`expected_calibration_error`.
    """
    options = _binning_options(n_bins, binning, kind)
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _underconfidence_compute(scores, weights, **options)


def brier_score(
    probabilities: Any, labels: Any, *, from_logits: bool = False, sample_weight: Any = None
) -> float:
    r"""Multiclass Brier score: the mean over samples of :math:`\sum_k (p_k - 1[y = k])^2`, in ``[0, 2]``.

    A binary model's single column is expanded to ``[1 - p, p]`` first, so a binary Brier score here is
    twice ``sklearn.metrics.brier_score_loss`` (which scores the positive class only). Divide by
    ``n_classes`` for the per-class-mean convention some papers use. Computed in float64.
    """
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _brier_compute(scores, weights)


def negative_log_likelihood(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    sample_weight: Any = None,
    clip: float | None = None,
) -> float:
    r"""Mean negative log-likelihood :math:`-\frac{1}{N}\sum_i \log p_{i, y_i}`, in float64.

    Exact by default: from logits through ``log_softmax`` (no rounding through probabilities, finite for
    logits of any size); from probabilities, ``-log p_y``, which is ``inf`` when a true class has
    probability 0. ``clip=eps`` clips ``p_y`` to ``[eps, 1 - eps]`` first, as ``sklearn.metrics.log_loss``
    does with ``eps = finfo(dtype).eps`` (from logits, ``log p_y`` is clipped to the same range).
    """
    options = _nll_options(clip)
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _nll_compute(scores, weights, **options)


def accuracy(
    probabilities: Any, labels: Any, *, from_logits: bool = False, sample_weight: Any = None
) -> float:
    """Share of samples whose argmax class (lowest index on ties) is the label."""
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _accuracy_compute(scores, weights)


@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """A reliability diagram's data: per-bin counts, mean confidence and accuracy, and the ECE they give.

    Arrays have one entry per bin (``edges`` one more) and are read-only. Empty bins (no positive weight)
    hold NaN in ``mean_confidence`` and ``accuracy``; :meth:`to_dict` writes ``None`` (JSON null) there.
    ``counts`` are numbers of rows; ``proportions`` are the bins' shares ``w_b`` of the total weight (equal
    to ``counts / n`` without weights). ``overconfidence + underconfidence == ece``.
    """

    edges: np.ndarray
    counts: np.ndarray
    proportions: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    ece: float
    mce: float
    overconfidence: float
    underconfidence: float
    n_bins: int
    binning: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: lists of floats and ints, ``None`` for the means of empty bins."""

        def with_nulls(values: np.ndarray) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values.tolist()]

        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "proportions": self.proportions.tolist(),
            "mean_confidence": with_nulls(self.mean_confidence),
            "accuracy": with_nulls(self.accuracy),
            "ece": self.ece,
            "mce": self.mce,
            "overconfidence": self.overconfidence,
            "underconfidence": self.underconfidence,
            "n_bins": self.n_bins,
            "binning": self.binning,
            "kind": self.kind,
        }


def reliability_bins(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    kind: str = "top_label",
    sample_weight: Any = None,
) -> ReliabilityBins:
    """Per-bin statistics of a reliability diagram, with the (L1) ECE, MCE and its two parts.

    ``kind`` is ``"top_label"`` or ``"positive_class"`` (classwise errors have one diagram per class).
    For ``kind="positive_class"`` the bins' ``accuracy`` is the observed frequency of class 1, as
    ``sklearn.calibration.calibration_curve``'s ``prob_true``. Other parameters as in
    :func:`expected_calibration_error`.
    """
    options = _binning_options(n_bins, binning, kind)
    if options["kind"] == "classwise":
        raise InvalidInput(
            'reliability_bins needs kind="top_label" or "positive_class"; classwise errors have one '
            "diagram per class",
            field="kind",
        )
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    sums = _binned(scores, weights, **options)
    nonempty, mean_confidence, bin_accuracy = (a[0] for a in _bin_means(sums))
    over, under = (float(part[0]) for part in _error_parts(sums))

    def frozen(values: np.ndarray) -> np.ndarray:
        values = np.array(values)
        values.flags.writeable = False
        return values

    return ReliabilityBins(
        edges=frozen(sums.edges[0]),
        counts=frozen(sums.counts[0].astype(np.int64)),
        proportions=frozen(sums.mass[0] / sums.total[0]),
        mean_confidence=frozen(np.where(nonempty, mean_confidence, np.nan)),
        accuracy=frozen(np.where(nonempty, bin_accuracy, np.nan)),
        ece=float(_calibration_errors(sums, norm="l1", debiased=False)[0]),
        mce=float(_calibration_errors(sums, norm="max", debiased=False)[0]),
        overconfidence=over,
        underconfidence=under,
        **options,
    )


def per_class_calibration_tests(
    probabilities: Any, labels: Any, *, from_logits: bool = False
) -> dict[str, list[float | None]]:
    """The statistical calibration tests of each class's probability ``p_k`` against ``1[y = k]``.

    :func:`service.core.calibration_tests.calibration_tests` once per class (a binary model's one column
    gives its two classes): ``{figure: [value of class 0, ..., class K-1]}``, ``None`` where a figure is
    undefined for a class (no row of that class, or every ``p_k`` in {0, 1}). Unweighted. The p-values are
    per class: with K classes, K tests at level alpha reject a calibrated model somewhere with probability
    up to K alpha (Bonferroni: gate on ``alpha / K``).
    """
    scores, _ = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=None)
    out: dict[str, list[float | None]] = {}
    for k in range(scores.n_classes):
        cancellation.check()
        figures = calibration_tests.calibration_tests_checked(
            scores.probabilities[:, k].astype(np.float64), (scores.labels == k).astype(np.float64)
        )
        for name, value in figures.items():
            out.setdefault(name, []).append(value if math.isfinite(value) else None)
    return out


def smooth_reliability(
    probabilities: Any, labels: Any, *, from_logits: bool = False
) -> smooth_calibration.SmoothReliability:
    """The smoothed reliability diagram of the top-label confidence (kernel estimate of the accuracy at each
    confidence, at smECE's bandwidth; :func:`service.core.smooth_calibration.smooth_reliability`)."""
    scores, _ = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=None)
    return smooth_calibration.smooth_reliability(
        scores.confidences.astype(np.float64), scores.correct.astype(np.float64)
    )


class BootstrapInterval(NamedTuple):
    """A bootstrap confidence interval (percentile or BCa); unpacks as ``low, high``."""

    low: float
    high: float


INTERVAL_METHODS = ("basic", "bca", "percentile")
JACKKNIFE_GROUPS = 200
"""Most groups of the grouped jackknife that estimates BCa's acceleration: leave-one-out (exact, as
``scipy.stats.bootstrap``) up to this many rows, then this many groups of about ``n / 200`` rows each."""
INTERVAL_CONVENTIONS = {
    "basic": "bias-corrected (basic bootstrap): the interval of the bootstrap-debiased estimate "
    "2 theta - mean(theta*), [2 theta - q_(1+c)/2, 2 theta - q_(1-c)/2] of the resamples' quantiles q, "
    "lower bound at least 0",
    "bca": "BCa (Efron 1987): percentile levels corrected for the bootstrap median bias z0 = Phi^-1(share of "
    f"resamples below the estimate) and the acceleration of a jackknife (leave-one-out up to "
    f"{JACKKNIFE_GROUPS} rows, else {JACKKNIFE_GROUPS} groups)",
    "percentile": "percentile: the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resamples",
}


# Metrics computed from prepared scores and resampled weights, skipping validation, softmax, argmax and
# width binning in every resample: (option checker, computation).
_FAST_PATHS: dict[Callable[..., float], tuple[Callable[..., dict[str, Any]], Callable[..., float]]] = {
    expected_calibration_error: (_ece_options, _ece_compute),
    maximum_calibration_error: (_mce_options, _ece_compute),
    overconfidence_error: (_binning_options, _overconfidence_compute),
    underconfidence_error: (_binning_options, _underconfidence_compute),
    brier_score: (_no_options, _brier_compute),
    negative_log_likelihood: (_nll_options, _nll_compute),
    accuracy: (_no_options, _accuracy_compute),
}
# Figures whose plug-in estimate is biased upwards (a sum or maximum of absolute bin gaps): BCa by default.
_BIASED_UPWARDS = frozenset(
    {expected_calibration_error, maximum_calibration_error, overconfidence_error, underconfidence_error}
)


def default_interval_method(metric: Callable[..., float]) -> str:
    """``"basic"`` (bias-corrected) for the binned calibration errors of this module (ECE and its variants,
    MCE, the two parts of ECE), whose resampled values sit mostly above the estimate; ``"percentile"``
    otherwise.

    Why ``basic`` rather than ``bca``: 90 % intervals of the ECE of simulated over-confident models, 100
    data sets each (``tests/core/test_bootstrap_bca.py``), covered the population ECE 84-91 times with
    ``basic`` in every setting tried, 68-87 with ``bca`` and 15-91 with ``percentile`` (15 for a nearly
    calibrated model: population ECE 0.0125 at 5,000 rows, where the resamples' upward bias is largest
    against the spread).
    """
    return "basic" if metric in _BIASED_UPWARDS else "percentile"


def check_bootstrap(n_resamples: Any, n_samples: int) -> int:
    """``n_resamples`` checked against ``MAX_BOOTSTRAP_RESAMPLES`` and ``n_resamples x n_samples`` against
    ``MAX_BOOTSTRAP_WORK``; InvalidInput naming the limit."""
    n_resamples = check_positive_int(n_resamples, "n_resamples", maximum=MAX_BOOTSTRAP_RESAMPLES)
    check_work(
        n_resamples * n_samples,
        MAX_BOOTSTRAP_WORK,
        "bootstrap",
        f"bootstrap work ({n_resamples:,} resamples x {n_samples:,} rows)",
    )
    return n_resamples


def bootstrap_interval(
    metric: Callable[..., float],
    probabilities: Any,
    labels: Any,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    sample_weight: Any = None,
    method: str | None = None,
    **metric_kwargs: Any,
) -> BootstrapInterval:
    r"""Bootstrap interval of ``metric(probabilities, labels, **metric_kwargs)``: BCa or percentile.

    Each resample draws ``n_samples`` rows uniformly with replacement (``numpy.random.default_rng(seed)``),
    giving ``B`` values :math:`\hat\theta^*_b`.

    ``method="percentile"``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear
    interpolation) of the resampled values (Efron and Tibshirani 1993, ch. 13).

    ``method="bca"``: the bias-corrected and accelerated interval (Efron 1987; Efron and Tibshirani 1993,
    ch. 14.3), the quantiles at levels

    .. math::

        \alpha_{1,2} = \Phi\Big(z_0 + \frac{z_0 + z_{\alpha}}{1 - a (z_0 + z_{\alpha})}\Big), \quad
        z_0 = \Phi^{-1}\big(\#\{\hat\theta^*_b < \hat\theta\} / B\big), \quad
        a = \frac{\sum_j (\bar\theta_{(\cdot)} - \hat\theta_{(j)})^3}
                 {6 \big(\sum_j (\bar\theta_{(\cdot)} - \hat\theta_{(j)})^2\big)^{3/2}}

    with :math:`z_\alpha = \Phi^{-1}((1 \mp \text{confidence}) / 2)` and :math:`\hat\theta_{(j)}` the
    estimate without row ``j`` (up to :data:`JACKKNIFE_GROUPS` rows: exactly ``scipy.stats.bootstrap``'s
    ``method="BCa"`` given the same resamples), or without the ``j``-th of :data:`JACKKNIFE_GROUPS` groups
    of rows (a grouped jackknife; the groups are a seeded random partition). Binned calibration errors are
    biased upwards (each bin adds :math:`|\text{gap}_b|`, and noise only makes it larger): on real data
    after temperature scaling only 1.5-2.4 % of resampled ECEs fell below the estimate, and the percentile
    interval excluded it. :math:`z_0` moves the levels down by as much. Where BCa is undefined (an infinite
    estimate or jackknife value, or every resample on one side of the estimate: :math:`z_0 = \pm\infty`
    then gives the resamples' minimum or maximum), the levels are those its formula gives at the limit.

    ``method="basic"``: the basic bootstrap interval :math:`[2\hat\theta - q_{(1+c)/2},
    2\hat\theta - q_{(1-c)/2}]` (Davison and Hinkley 1997, eq. 5.6; ``scipy.stats.bootstrap``'s
    ``method="basic"``), the interval of the bootstrap-debiased estimate :math:`2\hat\theta -
    \bar\theta^*`: where the resamples sit above the estimate by a bias, the interval sits below it by as
    much. For this module's metrics (never negative) its lower bound is raised to 0.

    ``method=None`` (default): ``"basic"`` for the binned calibration errors of this module
    (:func:`default_interval_method` says why), ``"percentile"`` for the others.

    ``metric`` is any function of ``(probabilities, labels, **metric_kwargs)`` returning a float (also given
    ``sample_weight`` when one is passed here). The metrics of this module (passed themselves, not wrapped
    in a lambda) take a fast path that computes softmax, argmax and width bins once and turns each
    resample into frequency weights; the result is the same as resampling rows, up to float rounding.
    Resamples whose weights sum to 0 are skipped.

    Returns
    -------
    BootstrapInterval
        ``(low, high)``.
    """
    n_resamples = check_positive_int(n_resamples, "n_resamples", maximum=MAX_BOOTSTRAP_RESAMPLES)
    if isinstance(confidence, bool) or not isinstance(confidence, float | int | np.floating):
        raise InvalidInput(f"confidence must be a number in (0, 1), got {confidence!r}", field="confidence")
    if not 0.0 < float(confidence) < 1.0:
        raise InvalidInput(f"confidence must be a number in (0, 1), got {confidence!r}", field="confidence")
    if not callable(metric):
        raise InvalidInput(f"metric must be a function, got {metric!r}", field="metric")
    method = default_interval_method(metric) if method is None else method
    method = check_choice(method, "method", INTERVAL_METHODS)
    from_logits = bool(metric_kwargs.get("from_logits", False))
    rng = np.random.default_rng(seed)

    fast_path = _FAST_PATHS.get(metric)
    if fast_path is not None:
        check_options, compute = fast_path
        options = check_options(**{k: v for k, v in metric_kwargs.items() if k != "from_logits"})
        scores, weights = _prepare(
            probabilities, labels, from_logits=from_logits, sample_weight=sample_weight
        )
        n_samples = scores.n_samples
        check_bootstrap(n_resamples, n_samples)

        def resampled(rows: np.ndarray) -> float:
            frequency = np.bincount(rows, minlength=n_samples).astype(np.float64)
            resample_weights = frequency if weights is None else frequency * weights
            if resample_weights.sum() <= 0:
                return math.nan
            return compute(scores, resample_weights, **options)

        def estimate() -> float:
            return compute(scores, weights, **options)

        def without(rows: np.ndarray) -> float:
            kept = np.ones(n_samples) if weights is None else weights.copy()
            kept[rows] = 0.0
            return compute(scores, kept, **options) if kept.sum() > 0 else math.nan

    else:
        values, y, weights = check_labelled(
            probabilities, labels, from_logits=from_logits, sample_weight=sample_weight
        )
        n_samples = values.shape[0]
        check_bootstrap(n_resamples, n_samples)

        def resampled(rows: np.ndarray) -> float:
            if weights is None:
                return float(metric(values[rows], y[rows], **metric_kwargs))
            if weights[rows].sum() <= 0:
                return math.nan
            return float(metric(values[rows], y[rows], sample_weight=weights[rows], **metric_kwargs))

        def estimate() -> float:
            return resampled(np.arange(n_samples))

        def without(rows: np.ndarray) -> float:
            kept = np.ones(n_samples, dtype=bool)
            kept[rows] = False
            return resampled(np.flatnonzero(kept)) if kept.any() else math.nan

    def one_resample() -> float:
        cancellation.check()
        return resampled(rng.integers(0, n_samples, n_samples))

    statistics = np.array([one_resample() for _ in range(n_resamples)])
    statistics = statistics[~np.isnan(statistics)]
    if statistics.size == 0:
        raise InvalidInput("every bootstrap resample had zero total sample_weight", field="sample_weight")
    tail = (1.0 - float(confidence)) / 2.0
    levels = [tail, 1.0 - tail]
    if method == "bca":
        # after the resamples, so that a seed gives the same resamples whichever the method
        groups = _jackknife_groups(n_samples, rng)
        jackknife = []
        for rows in groups:
            cancellation.check()
            jackknife.append(without(rows))
        levels = bca_levels(estimate(), statistics, np.array(jackknife), levels)
    if method == "basic":
        theta = estimate()
        if math.isfinite(theta):
            upper_quantile, lower_quantile = _quantiles(statistics, levels[::-1])
            low, high = 2.0 * theta - upper_quantile, 2.0 * theta - lower_quantile
            if fast_path is not None:  # this module's metrics are never negative
                low = max(low, 0.0)
            return BootstrapInterval(low, high)
    return BootstrapInterval(*_quantiles(statistics, levels))


def _jackknife_groups(n_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows left out by each jackknife value: one row each up to :data:`JACKKNIFE_GROUPS` rows, else a
    seeded random partition into that many groups of near-equal size."""
    if n_samples <= JACKKNIFE_GROUPS:
        return [np.array([row]) for row in range(n_samples)]
    return np.array_split(rng.permutation(n_samples), JACKKNIFE_GROUPS)


def bca_levels(
    estimate: float, statistics: np.ndarray, jackknife: np.ndarray, levels: Sequence[float]
) -> list[float]:
    """BCa's quantile levels (see :func:`bootstrap_interval`) for the nominal ``levels``.

    ``statistics`` are the resampled values, ``jackknife`` the leave-one-out (or leave-one-group-out)
    values; NaN jackknife values (a group that held every weight) are left out. The formulas are
    ``scipy.stats.bootstrap``'s (``scipy/stats/_resampling.py``, ``_bca_interval``). Where the estimate or
    a jackknife value is infinite, the acceleration is taken as 0.
    """
    from scipy.special import ndtr, ndtri  # scipy is a runtime dependency; imported where needed

    if not math.isfinite(estimate):
        return list(levels)
    z0 = float(ndtri(np.mean(statistics < estimate)))
    jackknife = jackknife[~np.isnan(jackknife)]
    acceleration = 0.0
    if jackknife.size > 1 and np.isfinite(jackknife).all():
        deviation = jackknife.mean() - jackknife
        denominator = 6.0 * float(np.sum(deviation**2)) ** 1.5
        if denominator > 0:
            acceleration = float(np.sum(deviation**3)) / denominator
    out = []
    for level in levels:
        z = float(ndtri(level))
        with np.errstate(divide="ignore", invalid="ignore"):
            shifted = z0 + (z0 + z) / (1.0 - acceleration * (z0 + z))
        out.append(float(ndtr(shifted)) if not math.isnan(shifted) else level)
    return out


def _quantiles(values: np.ndarray, levels: Sequence[float]) -> list[float]:
    """``numpy.quantile`` (linear interpolation) where an interpolation that touches ``inf`` is ``inf``
    (an exact NLL can be infinite in some resamples; numpy answers ``inf - inf = NaN`` there)."""
    finite = np.isfinite(values)
    if finite.all():
        return [float(q) for q in np.quantile(values, levels)]
    ordered = np.sort(values)
    out = []
    for level in levels:
        position = level * (ordered.size - 1)
        below, above = ordered[math.floor(position)], ordered[math.ceil(position)]
        if math.isinf(above):
            out.append(float(above) if position == math.ceil(position) or math.isinf(below) else math.inf)
        else:
            out.append(float(np.quantile(ordered, level)))
    return out


def calibration_report(
    probabilities: Any,
    labels: Any,
    *,
    from_logits: bool = False,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    sample_weight: Any = None,
    nll_clip: float | None = None,
    ece_convention: str | None = None,
) -> dict[str, Any]:
    """Every figure the service stores, from one validation, softmax and argmax.

    ``ece_convention`` (one of :data:`service.core.ece_conventions.CONVENTIONS` but ``"calibserve"``) adds
    ``ece_<convention>``: the top-label ECE of ``n_bins`` bins as that library computes it (unweighted).

    ``nll_clip=eps`` reports the clipped NLL of :func:`negative_log_likelihood` (``clip=eps``) under
    ``nll`` instead of the exact one, and says so in ``conventions["nll"]``; by default NLL is exact.

    Returns
    -------
    dict
        Plain floats under short names: ``ece`` (top-label, L1, ``binning``), ``mce``, ``ece_l2``,
        ``ece_debiased`` (Kumar et al. debiased L2), ``ece_mass`` (equal-mass bins), ``ece_classwise``,
        ``overconfidence`` and ``underconfidence`` (they add up to ``ece``), ``brier``, ``nll`` (exact;
        ``inf`` if a true class has probability 0, and then ``nll_infinite_rows`` lists those rows: the
        first :data:`MAX_LISTED_ROWS` indices, ascending), ``accuracy``; ``ece_positive_class`` for binary models
        only; without ``sample_weight``, the statistical tests of top-label calibration of
        :func:`service.core.calibration_tests.calibration_tests` (``spiegelhalter_z``/``_p``,
        ``ks_calibration``/``_p``, ``kuiper_calibration``/``_p``, ``calibration_slope``/``_se``,
        ``calibration_intercept``/``_se``, ``hosmer_lemeshow``/``_p``, ``ici``, ``e50``, ``e90``), each left
        out where it is undefined (NaN or infinite: e.g. every prediction right); ``n`` (number of rows, an
        int); and ``conventions`` (a dict of strings and ints stating them).
    """
    options = _binning_options(n_bins, binning, "top_label")
    clip = None if nll_clip is None else check_nll_clip(nll_clip)
    convention = check_ece_convention(ece_convention, weighted=sample_weight is not None)
    scores, weights = _prepare(probabilities, labels, from_logits=from_logits, sample_weight=sample_weight)
    return _report(scores, weights, options, nll_clip=clip, ece_convention=convention)


def check_ece_convention(convention: Any, *, weighted: bool = False) -> str | None:
    """An ``ece_convention`` option: None (or ``"calibserve"``, the report's own ``ece``) or a peer's."""
    if convention is None or convention == "calibserve":
        return None
    convention = check_choice(convention, "ece_convention", ece_conventions.CONVENTIONS)
    if weighted:
        raise InvalidInput(f"the {convention} ECE convention takes no sample weights", field="ece_convention")
    return convention


def calibration_report_checked(
    probabilities: np.ndarray | None,
    labels: np.ndarray,
    *,
    logits: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    n_bins: int = DEFAULT_N_BINS,
    binning: str = "width",
    probability_floor: float | None = None,
) -> dict[str, Any]:
    """:func:`calibration_report` of arrays validated already, without validating them again.

    For callers that hold the arrays :func:`service.core.validation.check_labelled` returned and the
    probabilities they computed from them (a fit's before/after figures): ``probabilities`` is a float
    ``(N, K)`` numpy array with ``K >= 2`` whose rows sum to 1, ``labels`` int in ``[0, K)``, ``logits`` the
    ``(N, K)`` or binary ``(N, 1)`` logits the probabilities are the softmax of (then NLL comes from them, as
    with ``from_logits=True``; ``probabilities=None`` computes that softmax here, with the top label in the
    same pass), ``sample_weight`` as ``check_sample_weight`` returns it. With
    ``probability_floor`` (and no logits), NLL is that of the probabilities floored there: ``-log(max(p_y,
    floor))``, finite where a true class has probability 0.
    """
    options = _binning_options(n_bins, binning, "top_label")
    predictions = maxima = None
    if probabilities is None:
        if logits is None:
            raise ValueError("calibration_report_checked needs probabilities or logits")
        probabilities, predictions, maxima = _softmax_top_label(logits)
    scores = _Scores(
        probabilities,
        labels,
        logits=logits,
        predictions=predictions,
        maxima=maxima,
        probability_floor=probability_floor,
    )
    return _report(scores, sample_weight, options)


def _report(
    scores: _Scores,
    weights: np.ndarray | None,
    options: dict[str, Any],
    *,
    nll_clip: float | None = None,
    ece_convention: str | None = None,
) -> dict[str, Any]:
    n_bins, binning = options["n_bins"], options["binning"]
    top_label = _binned(scores, weights, **options)
    mass = top_label if binning == "mass" else _binned(scores, weights, **{**options, "binning": "mass"})
    classwise = _binned(scores, weights, **{**options, "kind": "classwise"})
    over, under = _error_parts(top_label)

    def error(sums: _BinSums, norm: str = "l1", debiased: bool = False) -> float:
        return float(np.mean(_calibration_errors(sums, norm=norm, debiased=debiased)))

    report: dict[str, Any] = {
        "ece": error(top_label),
        "mce": error(top_label, "max"),
        "brier": _brier_compute(scores, weights),
        "nll": _nll_compute(scores, weights, clip=nll_clip),
        "accuracy": _accuracy_compute(scores, weights),
        "ece_classwise": error(classwise),
        "ece_l2": error(top_label, "l2"),
        "ece_mass": error(mass),
        "ece_debiased": error(top_label, "l2", debiased=True),
        "overconfidence": float(over[0]),
        "underconfidence": float(under[0]),
    }
    if ece_convention is not None:
        report[f"ece_{ece_convention}"] = ece_conventions.convention_ece(
            scores.probabilities, scores.labels, convention=ece_convention, n_bins=n_bins, kind="top_label"
        )
    if math.isinf(report["nll"]):
        # JSON has no infinity (the encoders write null): the rows that make it infinite say why
        report["nll_infinite_rows"] = infinite_nll_rows(scores, weights)
    if scores.n_classes == 2:
        report["ece_positive_class"] = error(
            _binned(scores, weights, **{**options, "kind": "positive_class"})
        )
    if weights is None:
        # the statistical tests of top-label calibration (unweighted); an undefined figure is left out
        confidences, correct = scores.confidences.astype(np.float64), scores.correct.astype(np.float64)
        tests = calibration_tests.calibration_tests_checked(confidences, correct)
        report.update({name: value for name, value in tests.items() if math.isfinite(value)})
        if scores.n_classes == 2:
            # binary models: the same tests of P(y = 1) against y, as ece_positive_class is to ece
            positive = calibration_tests.calibration_tests_checked(
                scores.probabilities[:, 1].astype(np.float64), (scores.labels == 1).astype(np.float64)
            )
            report.update(
                {f"{name}_positive_class": value for name, value in positive.items() if math.isfinite(value)}
            )
        # the binning-free calibration errors (unweighted, as relplot and Gupta et al. define them)
        report["ece_smooth"] = smooth_calibration.smooth_ece(confidences, correct)[0]
        report["ece_ks"] = smooth_calibration.ks_calibration_error(confidences, correct)
    report["n"] = scores.n_samples
    report["conventions"] = {
        "kind": "top_label",
        "binning": binning,
        "n_bins": n_bins,
        "bins": "(i/M, (i+1)/M], confidence 0 in bin 0"
        if binning == "width"
        else "equal mass: inverted-CDF quantile edges, (e_j, e_j+1], ties share a bin",
        "norm": "l1",
        "mce": "largest gap over non-empty bins",
        "ece_l2": "sqrt(sum_b w_b gap_b^2)",
        "ece_debiased": "Kumar et al. 2019 debiased L2, same bins",
        "ece_mass": f"{n_bins} equal-mass bins",
        "ece_classwise": "mean over classes of per-class L1 ECE, same binning",
        "ece_smooth": "smECE (Blasiok and Nakkiran 2023, relplot's smECE): kernel-smoothed |E[c - o | c]| "
        "weighted by the smoothed density, reflected Gaussian kernel, bandwidth the fixed point sigma = "
        "smECE_sigma; no bins; unweighted",
        "ece_ks": "KS calibration error (Gupta et al. 2021): max_k |(1/N) sum_{i<=k} (c - o)| sorted by c; "
        "ks_calibration is the same maximum divided by sigma (a test statistic); unweighted",
        "nll": nll_convention(nll_clip),
        "brier": "mean over samples of sum_k (p_k - 1[y=k])^2",
        "accuracy": "argmax, ties to the lowest class",
        **calibration_tests.CONVENTIONS,
    }
    if scores.n_classes == 2 and weights is None:
        report["conventions"]["calibration_tests_positive_class"] = (
            "binary models: each test's figure with the suffix _positive_class tests P(y = 1) against y"
        )
    if ece_convention is not None:
        report["conventions"][f"ece_{ece_convention}"] = ece_conventions.DESCRIPTIONS[ece_convention]
    return report


MAX_LISTED_ROWS = 1000
"""Most row indices a report lists in ``nll_infinite_rows``."""
NLL_EXACT = "exact"
"""``conventions["nll"]`` of the exact NLL, ``-log p_y``: infinite where ``p_y = 0`` (JSON null, with the rows in
``nll_infinite_rows``)."""


def nll_convention(clip: float | None) -> str:
    """``conventions["nll"]`` of a report whose NLL is exact (``clip=None``) or clipped at ``clip``."""
    if clip is None:
        return NLL_EXACT
    return f"clipped: -log clip(p_y, {clip!r}, 1 - {clip!r})"


def infinite_nll_rows(scores: _Scores, weights: np.ndarray | None) -> list[int]:
    """Rows (of positive weight) whose true class has probability 0: their exact NLL is infinite."""
    infinite = np.isinf(scores.true_class_log_probability)
    if weights is not None:
        infinite &= weights > 0
    return np.flatnonzero(infinite)[:MAX_LISTED_ROWS].tolist()


# ------------------------------------------------------------------------------------- fit-time figures

FIT_FIGURES = ("ece", "mce", "brier", "nll", "accuracy", "overconfidence", "underconfidence")
"""The figures a calibrator document stores at fit time (:func:`fit_figures`): the headline figures that
drift checks compare, and the two halves of ECE. The variants (``ece_l2``, ``ece_debiased``, ``ece_mass``,
``ece_classwise``, ``ece_positive_class``) are left to evaluations (:func:`calibration_report`)."""


class _RowSums:
    """What one fused pass gathers of a group of rows: per-row confidence and correctness, loss sums."""

    def __init__(self, n_samples: int):
        self.confidences = np.empty(n_samples)
        self.correct = np.empty(n_samples, dtype=np.bool_)
        self.brier = 0.0
        self.nll = 0.0
        self.infinite_rows: list[np.ndarray] = []  # rows whose true class has probability 0

    def add_block(
        self,
        part: slice,
        sum_exp: np.ndarray,
        sum_squares: np.ndarray,
        true_shifted: np.ndarray,
        nll_cap: float | None,
    ) -> None:
        """One block of a softmax: ``s = sum_k exp(z_k - m)``, ``sum_k exp(z_k - m)^2``, ``z_y - m``.

        The confidence is ``1/s`` (the largest probability is ``exp(0)/s``, as the softmax computes it),
        ``p_y = exp(z_y - m)/s``, Brier ``sum_k p_k^2 - 2 p_y + 1``, NLL ``log s - (z_y - m)`` (capped at
        ``nll_cap``, the NLL of floored probabilities).
        """
        confidences = np.divide(1.0, sum_exp, out=self.confidences[part])
        # sum p_k^2 - 2 p_y + 1 with p_k = e_k / s: (sum e_k^2) / s^2 - 2 e_y / s + 1
        true_probability = np.exp(true_shifted)
        true_probability *= confidences
        sum_squares *= confidences
        sum_squares *= confidences
        self.brier += float(np.add.reduce(sum_squares)) - 2.0 * float(np.add.reduce(true_probability))
        self.brier += confidences.shape[0]
        nll = np.log(sum_exp)
        nll -= true_shifted
        if nll_cap is not None:
            np.minimum(nll, nll_cap, out=nll)
        self.nll += float(np.add.reduce(nll))

    def figures(self, n_bins: int, *, reliability: bool = False) -> dict[str, Any]:
        n_samples = self.confidences.shape[0]
        ids = _width_bin_ids(self.confidences, n_bins)
        mass, confidence, outcome, counts = _bin_sums(ids, self.confidences, self.correct, None, n_bins)
        edges = _width_edges(n_bins)
        sums = _BinSums(mass[None], confidence[None], outcome[None], counts[None], edges[None])
        over, under = _error_parts(sums)
        report: dict[str, Any] = {
            "ece": float(_calibration_errors(sums, norm="l1", debiased=False)[0]),
            "mce": float(_calibration_errors(sums, norm="max", debiased=False)[0]),
            "brier": self.brier / n_samples,
            "nll": self.nll / n_samples,
            "accuracy": float(np.count_nonzero(self.correct)) / n_samples,
            "overconfidence": float(over[0]),
            "underconfidence": float(under[0]),
            "n": n_samples,
            "conventions": _fit_conventions(n_bins),
        }
        if math.isinf(self.nll):
            rows = np.concatenate(self.infinite_rows) if self.infinite_rows else np.empty(0, dtype=np.intp)
            report["nll_infinite_rows"] = rows[:MAX_LISTED_ROWS].tolist()
        if reliability:
            report["reliability"] = _fit_bins(sums)
        return report


def _fit_bins(sums: _BinSums) -> dict[str, list]:
    """The reliability bins of one group's sums, as a fit stores them: per bin the sample count, the mean
    confidence and the accuracy (None in an empty bin), as :func:`reliability_bins` computes them."""
    nonempty, mean_confidence, accuracy = (a[0] for a in _bin_means(sums))
    return {
        "counts": sums.counts[0].astype(np.int64).tolist(),
        "mean_confidence": [
            float(v) if ok else None for v, ok in zip(mean_confidence, nonempty, strict=True)
        ],
        "accuracy": [float(v) if ok else None for v, ok in zip(accuracy, nonempty, strict=True)],
    }


def _fit_conventions(n_bins: int) -> dict[str, Any]:
    return {
        "kind": "top_label",
        "binning": "width",
        "n_bins": n_bins,
        "bins": "(i/M, (i+1)/M], confidence 0 in bin 0",
        "norm": "l1",
        "mce": "largest gap over non-empty bins",
        "nll": "exact",
        "brier": "mean over samples of sum_k (p_k - 1[y=k])^2",
        "accuracy": "argmax, ties to the lowest class",
        "figures": "fit-time figures: ece, mce, brier, nll, accuracy, overconfidence, underconfidence; "
        "ece_l2, ece_debiased, ece_mass, ece_classwise and ece_positive_class come from evaluations",
    }


def _argmax_narrow(
    block: np.ndarray, maxima: np.ndarray, is_max: np.ndarray, weights: np.ndarray, out: np.ndarray
) -> None:
    """Lowest row index equal to each column's maximum of a ``(K, R)`` block (see ``scan_narrow``)."""
    np.equal(block, maxima, out=is_max.view(np.bool_))
    np.multiply(is_max, weights, out=is_max)
    np.maximum.reduce(is_max, axis=0, out=out)
    np.subtract(block.shape[0], out, out=out)


def fit_figures(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    groups: Sequence[tuple[float, float | None]] = ((1.0, None),),
    n_bins: int = DEFAULT_N_BINS,
    reliability: bool = False,
) -> list[dict[str, Any]]:
    """Fit-time figures (:data:`FIT_FIGURES`, ``n``, ``conventions``) of ``softmax(logits / T)`` for each
    ``(T, probability_floor)`` of ``groups``, in one fused pass over row blocks.

    For arrays :func:`service.core.validation.check_labelled` returned (float32 or float64 logits, one
    column for a binary model; int labels), unweighted, ``n_bins`` equal-width top-label bins. Each block
    is copied once into a float64 buffer, from which come the row maximum ``m``, the argmax (shared: it does
    not depend on ``T > 0``), ``z_y - m`` and, per group, ``s = sum exp((z - m)/T)`` and
    ``sum exp((z - m)/T)^2``: the softmax is never written out, and its classwise and equal-mass binning are
    not done. The numbers are those of :func:`calibration_report` (``from_logits=True``) to rounding
    (float64 sums in another order; a confidence within an ulp of a bin edge could change bin). With a
    ``probability_floor``, a group's NLL is capped at ``-log(probability_floor)``: the NLL of its
    probabilities floored there. ``reliability=True`` adds each group's bins (:func:`_fit_bins`: counts, mean
    confidence and accuracy per bin) under ``reliability``, from the sums the ECE is computed of.
    """
    z = two_column_logits(logits)
    n_samples, n_classes = z.shape
    y = labels
    plan = [
        (_RowSums(n_samples), None if t == 1.0 else 1.0 / t, None if floor is None else -math.log(floor))
        for t, floor in groups
    ]
    narrow = n_classes < ARGMAX_MIN_COLUMNS
    rows = min(n_samples, _NARROW_ROWS if narrow else max(1, _CHUNK // n_classes))
    shape = (n_classes, rows) if narrow else (rows, n_classes)
    shifted, exps = np.empty(shape), np.empty(shape)
    if narrow:
        is_max = np.empty(shape, dtype=np.uint8)
        weights = np.arange(n_classes, 0, -1, dtype=np.uint8)[:, None]
        argmax = np.empty(rows, dtype=np.uint8)
    axis = 0 if narrow else 1
    maxima, sum_exp, sum_squares = np.empty(rows), np.empty(rows), np.empty(rows)
    correct = np.empty(rows, dtype=np.bool_)
    for start in range(0, n_samples, rows):
        width = min(rows, n_samples - start)
        part = slice(start, start + width)
        y_part = y[part]
        if narrow:
            block, e = shifted[:, :width], exps[:, :width]
            np.copyto(block, z[part].T)
            m = np.maximum.reduce(block, axis=0, out=maxima[:width])
            _argmax_narrow(block, m, is_max[:, :width], weights, argmax[:width])
            top = argmax[:width]
            block -= m
            true_shifted = block[y_part, np.arange(width)]
        else:
            block, e = shifted[:width], exps[:width]
            np.copyto(block, z[part])
            m = np.maximum.reduce(block, axis=1, out=maxima[:width])
            top = block.argmax(axis=1)
            block -= m[:, None]
            true_shifted = block[np.arange(width), y_part]
        np.equal(top, y_part, out=correct[:width])
        for sums, factor, nll_cap in plan:
            sums.correct[part] = correct[:width]
            if factor is None:
                np.exp(block, out=e)
                shift_y = true_shifted
            else:
                np.multiply(block, factor, out=e)
                np.exp(e, out=e)
                shift_y = true_shifted * factor
            np.add.reduce(e, axis=axis, out=sum_exp[:width])
            np.multiply(e, e, out=e)
            np.add.reduce(e, axis=axis, out=sum_squares[:width])
            sums.add_block(part, sum_exp[:width], sum_squares[:width], shift_y, nll_cap)
    return [sums.figures(n_bins, reliability=reliability) for sums, _, _ in plan]


def fit_figures_of_probabilities(
    probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = DEFAULT_N_BINS,
    probability_floor: float | None = None,
    reliability: bool = False,
) -> dict[str, Any]:
    """:func:`fit_figures` of calibrated probabilities (float ``(N, K)``, ``K >= 2``, rows summing to 1):
    the same fused pass without the softmax; NLL ``-log(max(p_y, probability_floor))``."""
    n_samples, n_classes = probabilities.shape
    sums = _RowSums(n_samples)
    narrow = n_classes < ARGMAX_MIN_COLUMNS
    rows = min(n_samples, _NARROW_ROWS if narrow else max(1, _CHUNK // n_classes))
    shape = (n_classes, rows) if narrow else (rows, n_classes)
    squares = np.empty(shape)
    if narrow:
        columns = np.empty(shape, dtype=probabilities.dtype)
        is_max = np.empty(shape, dtype=np.uint8)
        weights = np.arange(n_classes, 0, -1, dtype=np.uint8)[:, None]
        argmax = np.empty(rows, dtype=np.uint8)
    sum_squares = np.empty(rows)
    floor = 0.0 if probability_floor is None else probability_floor
    for start in range(0, n_samples, rows):
        width = min(rows, n_samples - start)
        part = slice(start, start + width)
        y_part = labels[part]
        confidences = sums.confidences[part]
        if narrow:
            block, square = columns[:, :width], squares[:, :width]
            np.copyto(block, probabilities[part].T)
            np.maximum.reduce(block, axis=0, out=confidences)
            _argmax_narrow(block, confidences, is_max[:, :width], weights, argmax[:width])
            top = argmax[:width]
            true_probability = block[y_part, np.arange(width)].astype(np.float64)
            np.multiply(block, block, out=square)
            np.add.reduce(square, axis=0, out=sum_squares[:width])
        else:
            block, square = probabilities[part], squares[:width]
            top = block.argmax(axis=1)
            np.copyto(confidences, block[np.arange(width), top])
            true_probability = block[np.arange(width), y_part].astype(np.float64)
            np.multiply(block, block, out=square)
            np.add.reduce(square, axis=1, out=sum_squares[:width])
        np.equal(top, y_part, out=sums.correct[part])
        sums.brier += float(np.add.reduce(sum_squares[:width] - 2.0 * true_probability + 1.0))
        with np.errstate(divide="ignore"):  # p = 0 without a floor: the exact NLL is infinite
            sums.nll -= float(np.add.reduce(np.log(np.maximum(true_probability, floor))))
        if floor == 0.0:
            zero = np.flatnonzero(true_probability == 0.0)
            if zero.size:
                sums.infinite_rows.append(zero + start)
    return sums.figures(n_bins, reliability=reliability)
