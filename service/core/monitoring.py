"""Mergeable calibration statistics: the numbers behind live monitoring.

Each labelled outcome adds to its equal-width top-label bin (the service's convention: :data:`N_BINS` bins,
bin ``i`` = ``(i/M, (i+1)/M]``) five sums: the count, the confidence, the correct predictions, the Brier
score and the negative log-likelihood. Sums merge by addition, so time buckets, workers and replicas combine
exactly, in any order, and a window costs one sum per bin whatever the traffic. From them come the figures
of :func:`service.core.metrics.calibration_report` for the same rows, to float64 rounding:

.. math::

    \\mathrm{ECE} = \\frac{1}{n} \\sum_b |C_b - A_b|, \\qquad
    \\mathrm{MCE} = \\max_{b: n_b > 0} |C_b - A_b| / n_b,

with :math:`C_b` the sum of confidences and :math:`A_b` the number of correct predictions in bin ``b``;
Brier and NLL are their sums over ``n``. The over/under-confidence split is the ECE's part from bins where
:math:`C_b > A_b` and where :math:`C_b < A_b`.

Predictions without a label yet add to a finer histogram of top-label confidence (:data:`CONFIDENCE_BINS`
bins, with the sum of confidences), which gives the label-free figures: the expected accuracy implied by
calibrated confidences (the mean top-label probability, as NannyML's CBPE estimates it) and the shift of the
confidence distribution against the fit data (the population stability index and the Kolmogorov-Smirnov
statistic, the latter on the binned distributions: exact to the bin width, 1/:data:`CONFIDENCE_BINS`).

References
----------
Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (ECE, MCE).
Yurdakul, "Statistical Properties of Population Stability Index", 2018 (PSI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.metrics import DEFAULT_N_BINS, _Scores, _width_bin_ids

N_BINS = DEFAULT_N_BINS
CONFIDENCE_BINS = 100
# PSI of an empty bin: a small fraction stands for zero, as is usual for PSI (else it is infinite).
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class RowStatistics:
    """Per-row figures of labelled probabilities: the top-label bin, confidence, correctness, Brier, NLL."""

    bins: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    brier: np.ndarray
    nll: np.ndarray


def row_statistics(
    probabilities: np.ndarray, labels: np.ndarray, *, logits: np.ndarray | None = None
) -> RowStatistics:
    """The per-row figures of ``probabilities`` (float64, ``(N, K)``, ``K >= 2``) against ``labels``.

    With ``logits`` (those the probabilities are the softmax of), the log-likelihood comes from them exactly,
    as :func:`~service.core.metrics.calibration_report` computes it ``from_logits``.
    """
    scores = _Scores(probabilities, labels, logits=logits)
    confidence = scores.confidences.astype(np.float64)
    onehot_part = 1.0 - 2.0 * scores.true_class_probability
    brier = np.einsum("ij,ij->i", probabilities, probabilities, dtype=np.float64) + onehot_part
    with np.errstate(divide="ignore"):
        nll = -scores.true_class_log_probability
    return RowStatistics(
        bins=_width_bin_ids(scores.confidences, N_BINS),
        confidence=confidence,
        correct=scores.correct.astype(np.float64),
        brier=brier,
        nll=nll,
    )


@dataclass
class BinSums:
    """Per-bin sums (count, confidence, correct, Brier, NLL) of labelled outcomes; merge by ``+``."""

    n: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    brier: np.ndarray
    nll: np.ndarray

    FIELDS = ("n", "confidence", "correct", "brier", "nll")

    @classmethod
    def empty(cls, n_bins: int = N_BINS) -> BinSums:
        return cls(*(np.zeros(n_bins) for _ in cls.FIELDS))

    @classmethod
    def of_rows(cls, rows: RowStatistics, n_bins: int = N_BINS) -> BinSums:
        def add(values: np.ndarray) -> np.ndarray:
            return np.bincount(rows.bins, weights=values, minlength=n_bins)

        return cls(
            np.bincount(rows.bins, minlength=n_bins).astype(np.float64),
            add(rows.confidence),
            add(rows.correct),
            add(rows.brier),
            add(rows.nll),
        )

    def __add__(self, other: BinSums) -> BinSums:
        return BinSums(*(getattr(self, name) + getattr(other, name) for name in self.FIELDS))

    @classmethod
    def stack(cls, items: list[BinSums]) -> BinSums:
        """The sums of several windows or models along a leading axis (``(M, bins)`` fields), for
        :meth:`summary` of them all at once."""
        return cls(*(np.stack([getattr(item, name) for item in items]) for name in cls.FIELDS))

    @property
    def total(self) -> int:
        return int(self.n.sum())

    SUMMARY = (
        "ece",
        "mce",
        "brier",
        "nll",
        "accuracy",
        "mean_confidence",
        "overconfidence",
        "underconfidence",
    )

    def summary(self) -> dict[str, np.ndarray]:
        """``n`` and the figures of :data:`SUMMARY` along the last axis (NaN where there is no outcome), so one
        call judges every model of a ``/metrics`` scrape (:meth:`stack`)."""
        n = self.n.sum(axis=-1)
        gaps = self.confidence - self.correct
        # an empty bin's gap is 0, so dividing it by 1 instead of its count leaves the maximum unchanged
        bin_gaps = np.abs(gaps) / np.where(self.n > 0, self.n, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "n": n,
                "ece": np.abs(gaps).sum(axis=-1) / n,
                "mce": np.where(n > 0, bin_gaps.max(axis=-1, initial=0.0), np.nan),
                "brier": self.brier.sum(axis=-1) / n,
                "nll": self.nll.sum(axis=-1) / n,
                "accuracy": self.correct.sum(axis=-1) / n,
                "mean_confidence": self.confidence.sum(axis=-1) / n,
                "overconfidence": np.clip(gaps, 0.0, None).sum(axis=-1) / n,
                "underconfidence": np.clip(-gaps, 0.0, None).sum(axis=-1) / n,
            }

    def reliability_bins(self) -> list[dict[str, Any]]:
        """The reliability diagram's bins: edges, count, mean confidence and accuracy (None when empty)."""
        return [
            {
                "lower": i / len(self.n),
                "upper": (i + 1) / len(self.n),
                "count": int(count),
                "confidence": float(self.confidence[i] / count) if count else None,
                "accuracy": float(self.correct[i] / count) if count else None,
            }
            for i, count in enumerate(self.n)
        ]


def number(value: Any) -> float | None:
    """A figure as JSON carries it: a float, or None for NaN (no data)."""
    value = float(value)
    return None if value != value else value


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    """The :data:`CONFIDENCE_BINS`-bin of each top-label confidence (same convention as the figures)."""
    return _width_bin_ids(np.asarray(confidence, dtype=np.float64), CONFIDENCE_BINS)


def confidence_histogram(confidence: np.ndarray) -> np.ndarray:
    """Counts of top-label confidences in :data:`CONFIDENCE_BINS` equal-width bins."""
    return np.bincount(confidence_bins(confidence), minlength=CONFIDENCE_BINS).astype(np.int64)


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """PSI = sum_b (a_b - e_b) ln(a_b / e_b) of two histograms' fractions, along the last axis (NaN where either
    is empty)."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.maximum(expected / expected.sum(axis=-1, keepdims=True), PSI_EPSILON)
        a = np.maximum(actual / actual.sum(axis=-1, keepdims=True), PSI_EPSILON)
        psi = np.sum((a - e) * np.log(a / e), axis=-1)
    return np.where(_either_empty(expected, actual), np.nan, psi)


def kolmogorov_smirnov(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """The largest gap between the two histograms' cumulative distributions, at the bin edges, along the last
    axis (NaN where either is empty)."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = np.abs(
            np.cumsum(expected, axis=-1) / expected.sum(axis=-1, keepdims=True)
            - np.cumsum(actual, axis=-1) / actual.sum(axis=-1, keepdims=True)
        )
    return np.where(_either_empty(expected, actual), np.nan, gaps.max(axis=-1))


def _either_empty(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    return (expected.sum(axis=-1) == 0) | (actual.sum(axis=-1) == 0)
