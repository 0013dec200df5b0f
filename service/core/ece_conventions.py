r"""ECE as other libraries compute it: the same data, their number, to 1e-7.

Libraries agree on the formula, :math:`\mathrm{ECE} = \sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|`,
and disagree on everything around it: which side of a bin edge is closed, what becomes of a confidence of
exactly 1.0, in which precision the edges are compared, what is binned for a binary model, and how
equal-mass bins are cut. docs/ece-conventions.md has the table and the data that shows each difference.

``convention`` (``M = n_bins``; ``c`` the binned score, ``o`` its outcome):

``"calibserve"``
    :func:`service.core.metrics.expected_calibration_error` itself: bins ``(i/M, (i+1)/M]`` compared in the
    scores' own precision, ``c = 0`` in bin 0, float64 sums.
``"torchmetrics"``
    ``torchmetrics.functional.classification.multiclass_calibration_error`` (``kind="top_label"``: the
    confidence cast to float32) or ``binary_calibration_error`` (``kind="positive_class"``: ``p_1`` in its
    own dtype): ``torch.bucketize(c, torch.linspace(0, 1, M + 1), right=True) - 1``, i.e. bins
    ``[e_i, e_{i+1})`` closed on the left, and a confidence of exactly 1.0 in an ``(M+1)``-th bin of its
    own; the edges are torch's ``linspace`` in the confidences' dtype (one ulp off ``i/M`` for some ``i``);
    the bin sums accumulate in that dtype, row by row (``scatter_add_``), as they are reproduced here.
``"sklearn"``
    ``sklearn.calibration.calibration_curve(o, c, n_bins=M, strategy="uniform")`` weighted by its bin counts:
    bins ``(e_i, e_{i+1}]`` with float64 ``numpy.linspace`` edges, so a float32 confidence just above
    ``i/M`` in float64 (``float32(0.2) = 0.200000003``) goes to the bin above, where calibserve keeps it
    below (it equals the float32 edge).
``"netcal"``
    ``netcal.metrics.ECE(bins=M).measure(probabilities, labels)``: scores clipped to ``[eps, 1 - eps]``
    (``eps`` of their dtype), bins ``[e_i, e_{i+1})`` (``numpy.histogramdd``), and its own rule for what is
    binned: with at most two distinct labels in the data, ``p_1`` against the label (positive class, even
    for a multiclass model: it then refuses more than two columns), otherwise the top label; ``kind`` is
    not used.
``"guo2017"``
    The ``_ECELoss`` of Guo et al.'s reference code (github.com/gpleiss/temperature_scaling): bins
    ``(lo, hi]`` with edges ``torch.linspace(0, 1, M + 1)`` in float32 (``.item()``), top label only.
``"kumar2019"``
    Kumar et al.'s equal-mass estimator, ``calibration.lower_bound_scaling_ce(probs, labels, p=2,
    debias=True, num_bins=M, mode="top-label")`` (the ``uncertainty-calibration`` package), which their
    ``get_calibration_error`` calls on continuous scores (on scores with fewer than N/4 distinct values it
    switches to one bin per value instead): the debiased L2 error on their equal-mass bins. The sorted
    confidences are cut by ``numpy.array_split`` into ``min(M, N)`` groups, the edges are the midpoints
    between neighbouring groups (duplicates merged), plus 1.0, and ``c`` goes to the first edge ``>= c``.
    calibserve's ``binning="mass"`` cuts at quantiles instead: the same partition only when ``N`` is a
    multiple of ``M`` (up to 6.9e-4 apart on real sets, 0.12 at N = 40, M = 15).

References
----------
.. [1] Guo, Pleiss, Sun, Weinberger (2017). "On calibration of modern neural networks." ICML.
.. [2] Kumar, Liang, Ma (2019). "Verified uncertainty calibration." NeurIPS.
.. [3] Küppers, Kronenberger, Shantia, Haselhoff (2020). "Multivariate confidence calibration for object
       detection." CVPR workshops (netcal).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from service.errors import InvalidInput

__all__ = ["CONVENTIONS", "DESCRIPTIONS", "convention_ece", "torch_linspace"]

CONVENTIONS = ("calibserve", "torchmetrics", "sklearn", "netcal", "guo2017", "kumar2019")
DESCRIPTIONS = {
    "calibserve": "(i/M, (i+1)/M] in the scores' precision, confidence 0 in bin 0, float64 sums",
    "torchmetrics": "torchmetrics: [e_i, e_i+1) with torch.linspace edges, confidence 1.0 in a bin of its "
    "own, top label cast to float32, sums in the scores' dtype",
    "sklearn": "sklearn calibration_curve(strategy='uniform') weighted by bin counts: (e_i, e_i+1] with "
    "float64 numpy.linspace edges",
    "netcal": "netcal ECE: scores clipped to [eps, 1 - eps], [e_i, e_i+1), positive class when the labels "
    "hold two values or fewer, else top label",
    "guo2017": "Guo et al. 2017 reference _ECELoss: (lo, hi] with float32 torch.linspace edges, top label",
    "kumar2019": "Kumar et al. 2019 lower_bound_scaling_ce(p=2, debias=True, mode='top-label'): debiased L2 "
    "on equal-mass bins from numpy.array_split, edges midway between groups",
}


def torch_linspace(n_bins: int, dtype: np.dtype) -> np.ndarray:
    """``torch.linspace(0, 1, n_bins + 1)`` in ``dtype``, as numpy: torch computes it in vectorised pieces
    whose rounding differs from ``i / M`` (and from numpy's ``linspace``) by an ulp at some edges, and a
    confidence on such an edge changes bin; only torch itself gives its edges exactly."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise InvalidInput(
            "the torchmetrics and guo2017 ECE conventions need torch installed (their bin edges are "
            "torch.linspace's)",
            field="convention",
        ) from None
    torch_dtype = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
    return torch.linspace(0, 1, n_bins + 1, dtype=torch_dtype).numpy()


def convention_ece(
    probabilities: np.ndarray, labels: np.ndarray, *, convention: str, n_bins: int, kind: str
) -> float:
    """ECE of ``probabilities`` (``(N, K)``, ``K >= 2``, float32 or float64 as given, rows summing to 1) and
    integer ``labels`` under ``convention`` (module docstring); ``kind`` is ``"top_label"`` or
    ``"positive_class"`` (binary models) where the convention has the choice."""
    if convention == "netcal":
        return _netcal(probabilities, labels, n_bins)
    if convention == "guo2017":
        if kind != "top_label":
            raise InvalidInput('the guo2017 convention is top-label only (kind="top_label")', field="kind")
        confidence, outcome = _top_label(probabilities, labels)
        return _guo2017(confidence, outcome, n_bins)
    if kind == "top_label":
        confidence, outcome = _top_label(probabilities, labels)
    else:
        confidence, outcome = probabilities[:, 1], (labels == 1)
    if convention == "torchmetrics":
        if kind == "top_label":  # multiclass_calibration_error: confidences.float()
            confidence = confidence.astype(np.float32)
        return _torchmetrics(confidence, outcome, n_bins)
    if convention == "sklearn":
        return _sklearn(confidence, outcome, n_bins)
    if convention == "kumar2019":
        return _kumar2019(confidence, outcome, n_bins)
    raise InvalidInput(f"unknown ECE convention {convention!r}", field="convention")


def _top_label(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions = probabilities.argmax(axis=1)  # ties to the lowest index, as torch.max and numpy do
    return probabilities[np.arange(labels.size), predictions], predictions == labels


def _weighted_gaps(count: np.ndarray, confidence_sum: np.ndarray, outcome_sum: np.ndarray) -> float:
    """``sum_b (n_b / N) |acc_b - conf_b|`` over bins with samples, from float64 sums."""
    nonempty = count > 0
    gap = np.abs(outcome_sum[nonempty] / count[nonempty] - confidence_sum[nonempty] / count[nonempty])
    return float(np.sum(gap * count[nonempty]) / count.sum())


def _torchmetrics(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    dtype = confidence.dtype
    edges = torch_linspace(n_bins, dtype)
    ids = np.searchsorted(edges, confidence, side="right") - 1  # torch.bucketize(right=True) - 1
    # M + 1 slots, as torchmetrics allocates len(bin_boundaries): a confidence of 1.0 has the last one.
    # Sums in the scores' dtype, one row after another, as scatter_add_ makes them (float32 sums of 1M rows
    # drift by 5e-4: that is torchmetrics' number, so it is reproduced).
    count = np.zeros(n_bins + 1, dtype=dtype)
    confidence_sum = np.zeros(n_bins + 1, dtype=dtype)
    outcome_sum = np.zeros(n_bins + 1, dtype=dtype)
    np.add.at(count, ids, dtype.type(1))
    np.add.at(confidence_sum, ids, confidence)
    np.add.at(outcome_sum, ids, outcome.astype(dtype))
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence_mean = np.nan_to_num(confidence_sum / count)
        accuracy = np.nan_to_num(outcome_sum / count)
    proportion = count / count.sum()
    return float(np.sum(np.abs(accuracy - confidence_mean) * proportion, dtype=np.float64))


def _sklearn(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], confidence)  # calibration_curve's binids (float64 comparison)
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    confidence_sum = np.bincount(ids, weights=confidence, minlength=n_bins)
    outcome_sum = np.bincount(ids, weights=outcome, minlength=n_bins)
    return _weighted_gaps(count, confidence_sum, outcome_sum)


def _netcal(probabilities: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    epsilon = np.finfo(probabilities.dtype).eps
    clipped = np.clip(probabilities, epsilon, 1.0 - epsilon)
    if np.unique(labels).size <= 2:  # netcal's rule: a binary problem, scored on the positive class
        if clipped.shape[1] > 2:
            raise InvalidInput(
                "the netcal convention treats data with at most two distinct labels as binary and then "
                f"needs at most two score columns, got {clipped.shape[1]} (netcal raises the same)",
                field="convention",
            )
        confidence, outcome = clipped[:, 1], labels.astype(np.float64)
    else:
        confidence, outcome = clipped.max(axis=1), clipped.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges, confidence, side="right") - 1  # numpy.histogramdd: [e_i, e_i+1)
    ids[confidence == edges[-1]] -= 1  # (never after the clip; histogramdd's rule for the last edge)
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    confidence_sum = np.bincount(ids, weights=confidence, minlength=n_bins)
    outcome_sum = np.bincount(ids, weights=outcome, minlength=n_bins)
    return _weighted_gaps(count, confidence_sum, outcome_sum)


def _guo2017(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    # .item() of float32 edges: exact in either precision, so float64 comparisons are torch's comparisons
    edges = torch_linspace(n_bins, np.dtype(np.float32)).astype(np.float64)
    values = confidence.astype(np.float64)
    ids = np.searchsorted(edges, values, side="left") - 1  # lo < c <= hi
    inside = ids >= 0  # c <= 0 is in no bin (.gt(0) fails), as in the reference loop
    ids = ids[inside]
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    confidence_sum = np.bincount(ids, weights=values[inside], minlength=n_bins)
    outcome_sum = np.bincount(ids, weights=outcome[inside].astype(np.float64), minlength=n_bins)
    nonempty = count > 0
    gap = np.abs(confidence_sum[nonempty] / count[nonempty] - outcome_sum[nonempty] / count[nonempty])
    return float(np.sum(gap * count[nonempty]) / confidence.size)  # prop_in_bin = in_bin.mean()


def _kumar2019(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    ordered = np.sort(confidence)
    groups = np.array_split(ordered, min(n_bins, ordered.size))
    # midpoints in the scores' dtype, as (last + next_first) / 2.0 of numpy scalars computes them
    edges: list[Any] = [(groups[i][-1] + groups[i + 1][0]) / 2.0 for i in range(len(groups) - 1)]
    edges = sorted({float(edge) for edge in edges} | {1.0})
    ids = np.searchsorted(np.asarray(edges), confidence.astype(np.float64), side="left")
    n_edges = len(edges)
    count = np.bincount(ids, minlength=n_edges).astype(np.float64)
    confidence_sum = np.bincount(ids, weights=confidence.astype(np.float64), minlength=n_edges)
    outcome_sum = np.bincount(ids, weights=outcome.astype(np.float64), minlength=n_edges)
    enough = count >= 2
    mean_confidence = confidence_sum[enough] / count[enough]
    accuracy = outcome_sum[enough] / count[enough]
    # unbiased_square_ce: per bin of two or more rows, gap^2 - acc (1 - acc) / (n - 1), weighted by n / N
    squared = (mean_confidence - accuracy) ** 2 - accuracy * (1.0 - accuracy) / (count[enough] - 1.0)
    total = float(np.sum(count[enough] * squared) / count.sum())
    return max(total, 0.0) ** 0.5
