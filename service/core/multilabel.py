r"""Multi-label models: K independent sigmoid outputs, labels as a 0/1 matrix, and their figures.

A multi-label model (``task = "multilabel"``) answers, for each row, K logits ``z_k`` read independently:
``P(y_k = 1) = sigmoid(z_k)``. Its probabilities are K numbers in [0, 1] that need not sum to 1, and its
labels are a 0/1 matrix ``Y`` of shape ``(n_samples, n_labels)``.

Conventions of the figures (:func:`label_figures`)
--------------------------------------------------
- Each label is a binary problem scored on its positive-class probability ``p_k`` (not the top-label
  confidence ``max(p_k, 1 - p_k)``).
- ECE and MCE per label: ``M = 15`` equal-width bins of ``p_k``, bin ``i`` holding ``i/M < p <= (i+1)/M``
  (``p = 0`` in bin 0, the binning of :mod:`service.core.metrics`); ECE is
  :math:`\sum_i \frac{n_i}{n} |\bar y_i - \bar p_i|`, MCE :math:`\max_i |\bar y_i - \bar p_i|` over non-empty
  bins.
- Brier per label: :math:`\frac1n \sum_j (p_{jk} - y_{jk})^2` (scikit-learn's ``brier_score_loss``); NLL per
  label: the mean binary cross-entropy in nats, exact (infinite where a label's true outcome has
  probability 0; computed with ``log_sigmoid`` from logits, so it stays finite there).
- ``macro``: the unweighted mean over labels of each per-label figure. ``micro``: the figure of all
  ``(row, label)`` pairs pooled as one binary problem (``n_samples x n_labels`` pairs).

References
----------
- G. Tsoumakas, I. Katakis, "Multi-label classification: an overview", IJDWM 2007.
- C. Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (ECE, MCE, equal-width bins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit, log_expit

from service.core.validation import _first_row, _to_numpy, check_logits, check_positive_int
from service.errors import InvalidInput

TASKS = ("multiclass", "multilabel")
"""The tasks a model may declare: ``multiclass`` (softmax over its classes, binary included; the default)
and ``multilabel`` (K independent sigmoid outputs)."""
MULTILABEL = "multilabel"
DEFAULT_N_BINS = 15
MAX_N_BINS = 10_000
FIGURES = ("ece", "mce", "brier", "nll")
_PROBABILITY_FLOOR = 1e-300  # the logit of a probability of 0 (log 1e-300 = -690.8), as workflows does


def check_task(task: Any) -> str:
    """A model's task: ``multiclass`` (None too) or ``multilabel``."""
    if task is None:
        return "multiclass"
    if task not in TASKS:
        raise InvalidInput(f"task must be one of {', '.join(TASKS)}; got {task!r}", field="task")
    return task


# -------------------------------------------------------------------------------------------- validation


def check_label_matrix(labels: Any, n_samples: int, n_labels: int, name: str = "labels") -> np.ndarray:
    """Multi-label targets as an int8 0/1 matrix of shape ``(n_samples, n_labels)``.

    ``labels`` is either a 0/1 matrix (integers, or booleans) of that shape, or one list of label indices
    in ``[0, n_labels)`` per row (``[[0, 3], [], [2]]``; an index may appear once per row). A rectangular
    ``n_samples x n_labels`` array holding only 0 and 1 is always read as the matrix: with two labels,
    rows such as ``[0, 1]`` would also be valid index lists, and the matrix reading is the one kept.
    """
    if isinstance(labels, np.ndarray) or hasattr(labels, "detach"):
        array = _to_numpy(labels, name)
        if array.ndim == 2:
            return _matrix(array, n_samples, n_labels, name)
        if array.dtype.kind != "O":
            raise InvalidInput(
                f"{name} of a multi-label model must be a 0/1 matrix ({n_samples}, {n_labels}) or a list "
                f"of label-index lists, got shape {array.shape}",
                field=name,
            )
        labels = array.tolist()
    if not isinstance(labels, Sequence) or isinstance(labels, str | bytes):
        raise InvalidInput(
            f"{name} of a multi-label model must be a 0/1 matrix or a list of label-index lists", field=name
        )
    if len(labels) != n_samples:
        raise InvalidInput(f"{name} has {len(labels)} rows but the scores have {n_samples} rows", field=name)
    rows = [_to_numpy(row, f"{name}[{i}]") for i, row in enumerate(labels)]
    if all(row.ndim == 1 and row.shape[0] == n_labels for row in rows) and rows:
        stacked = np.stack(rows) if rows[0].dtype.kind != "O" else np.array(labels, dtype=object)
        if stacked.dtype.kind == "b" or _is_binary(stacked):
            return _matrix(stacked, n_samples, n_labels, name)
    widths = {row.shape[0] for row in rows if row.ndim == 1}
    if len(widths) == 1 and all(row.ndim == 1 and _is_binary(row) for row in rows) and widths != {0}:
        width = widths.pop()
        if any(np.unique(row).size != row.size for row in rows):  # not index lists: a matrix of another width
            raise InvalidInput(
                f"{name} is a 0/1 matrix of {width} columns; the model has {n_labels} labels, so it must "
                f"have shape ({n_samples}, {n_labels})",
                field=name,
            )
    matrix = np.zeros((n_samples, n_labels), dtype=np.int8)
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise InvalidInput(f"{name}[{i}] must be a list of label indices", field=name, row=i)
        if row.size == 0:
            continue
        if row.dtype.kind == "b" or any(type(v) is bool for v in labels[i]):
            raise InvalidInput(f"{name}[{i}] holds a boolean, not a label index", field=name, row=i)
        if row.dtype.kind not in "iu":
            if row.dtype.kind == "f" and np.all(np.isfinite(row)) and np.all(row == np.round(row)):
                row = row.astype(np.int64)
            else:
                raise InvalidInput(f"{name}[{i}] must hold integer label indices", field=name, row=i)
        if (row < 0).any() or (row >= n_labels).any():
            bad = row[(row < 0) | (row >= n_labels)][0]
            raise InvalidInput(
                f"{name}[{i}] holds label index {int(bad)}, outside [0, {n_labels})", field=name, row=i
            )
        if np.unique(row).size != row.size:
            raise InvalidInput(f"{name}[{i}] repeats a label index", field=name, row=i)
        matrix[i, row] = 1
    return matrix


def _is_binary(array: np.ndarray) -> bool:
    if array.dtype.kind == "O":
        return all(type(v) is not bool and v in (0, 1) for v in array.ravel().tolist())
    return array.dtype.kind in "iuf" and bool(np.isin(array, (0, 1)).all())


def _matrix(array: np.ndarray, n_samples: int, n_labels: int, name: str) -> np.ndarray:
    if array.shape != (n_samples, n_labels):
        raise InvalidInput(
            f"{name} must have shape ({n_samples}, {n_labels}) (rows x labels), got {array.shape}", field=name
        )
    if array.dtype.kind == "b":
        return array.astype(np.int8)
    if array.dtype.kind == "O":
        if any(type(v) is bool for v in array.ravel().tolist()):
            raise InvalidInput(f"{name} mixes booleans and numbers", field=name)
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"{name} must hold 0 and 1 only", field=name) from None
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"{name} must hold 0 and 1 only, got dtype {array.dtype}", field=name)
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        row = _first_row(bad)
        raise InvalidInput(f"{name}[{row}] holds a value other than 0 and 1", field=name, row=row)
    return array.astype(np.int8)


def check_multilabel(
    logits: Any, labels: Any, *, n_labels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(logits, Y)``: finite float logits ``(n, K)`` and the int8 0/1 label matrix ``(n, K)``.

    ``n_labels`` (the model's declared label count) must match the logits' columns when given.
    """
    z = check_logits(logits)
    check_label_count(z.shape[1], n_labels, "logits")
    return z, check_label_matrix(labels, z.shape[0], z.shape[1])


def check_label_count(columns: int, n_labels: int | None, field: str) -> None:
    """InvalidInput when scores of ``columns`` columns do not fit a multi-label model of ``n_labels``."""
    if n_labels is not None and columns != n_labels:
        raise InvalidInput(
            f"the multi-label model has {n_labels} labels; {field} has {columns} columns (one per label)",
            field=field,
        )


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """``P(y_k = 1)`` of each label: the elementwise sigmoid, float64."""
    return expit(np.asarray(logits, dtype=np.float64))


def check_label_probabilities(probabilities: Any, name: str = "probabilities") -> np.ndarray:
    """Per-label probabilities: a finite 2-D float matrix with entries in [0, 1] (rows need not sum to 1)."""
    from service.core.validation import as_float_matrix

    p = as_float_matrix(probabilities, name)
    outside = (p < 0) | (p > 1)
    if outside.any():
        row = _first_row(outside)
        raise InvalidInput(f"{name} row {row} holds a value outside [0, 1]", field=name, row=row)
    return p


def probability_logits(probabilities: np.ndarray) -> np.ndarray:
    """The logit ``log(p / (1 - p))`` of each per-label probability (0 and 1 floored at 1e-300)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return np.log(np.clip(p, _PROBABILITY_FLOOR, 1.0)) - np.log(np.clip(1.0 - p, _PROBABILITY_FLOOR, 1.0))


# ----------------------------------------------------------------------------------------------- figures


def _bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``i`` with ``i/M < p <= (i+1)/M`` (``p = 0`` in bin 0), as :mod:`service.core.metrics` bins."""
    edges = np.arange(n_bins + 1) / n_bins
    return np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)


def _binary_figures(
    p: np.ndarray, y: np.ndarray, log_p: np.ndarray, log_q: np.ndarray, n_bins: int
) -> tuple[dict[str, Any], dict[str, list]]:
    """ECE, MCE, Brier, NLL, prevalence and the reliability bins of one binary problem (flat arrays)."""
    n = p.size
    ids = _bin_ids(p, n_bins)
    counts = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    filled = counts > 0
    mean_p = np.divide(sum_p, counts, out=np.zeros(n_bins), where=filled)
    mean_y = np.divide(sum_y, counts, out=np.zeros(n_bins), where=filled)
    gaps = np.abs(mean_y - mean_p)
    with np.errstate(invalid="ignore"):
        nll = -float(np.mean(np.where(y == 1, log_p, log_q)))
    figures = {
        "ece": float(counts[filled] @ gaps[filled] / n),
        "mce": float(gaps[filled].max()) if filled.any() else 0.0,
        "brier": float(np.mean((p - y) ** 2)),
        "nll": nll,
        "prevalence": float(y.mean()),
        "mean_probability": float(p.mean()),
        "n_positive": int(y.sum()),
    }
    edges = np.arange(n_bins + 1) / n_bins
    bins = {
        "lower": edges[:-1][filled].tolist(),
        "upper": edges[1:][filled].tolist(),
        "count": counts[filled].tolist(),
        "mean_probability": mean_p[filled].tolist(),
        "frequency": mean_y[filled].tolist(),
    }
    return figures, bins


def label_figures(
    labels: np.ndarray,
    *,
    probabilities: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    n_bins: int = DEFAULT_N_BINS,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-label ECE, MCE, Brier and NLL with their macro and micro averages, and the reliability bins
    of each label (see the module's conventions).

    Give validated ``logits`` (the NLL then comes from ``log_sigmoid`` and stays finite) or per-label
    ``probabilities``, and the 0/1 ``labels`` matrix of the same shape.

    Returns
    -------
    dict
        ``per_label`` (one dict per label: ``ece``, ``mce``, ``brier``, ``nll``, ``prevalence``,
        ``mean_probability``, ``n_positive``, and ``name`` when ``label_names`` are given), ``macro`` and
        ``micro`` (``ece``, ``mce``, ``brier``, ``nll``), ``reliability`` (per label: the non-empty bins'
        ``lower``, ``upper``, ``count``, ``mean_probability``, ``frequency``), ``n``, ``n_labels`` and
        ``conventions``. A non-finite NLL (a true outcome of probability 0) is ``inf`` here.
    """
    n_bins = check_positive_int(n_bins, "n_bins", maximum=MAX_N_BINS)
    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)
        p = expit(z)
        log_p, log_q = log_expit(z), log_expit(-z)
    elif probabilities is not None:
        p = np.asarray(probabilities, dtype=np.float64)
        with np.errstate(divide="ignore"):
            log_p, log_q = np.log(p), np.log1p(-p)
    else:
        raise InvalidInput("label_figures needs logits or probabilities")
    y = np.asarray(labels)
    if y.shape != p.shape:
        raise InvalidInput(f"labels have shape {y.shape}; the scores {p.shape}", field="labels")
    y = y.astype(np.float64)
    per_label, reliability = [], []
    for k in range(p.shape[1]):
        figures, bins = _binary_figures(p[:, k], y[:, k], log_p[:, k], log_q[:, k], n_bins)
        if label_names is not None:
            figures = {"name": label_names[k], **figures}
        per_label.append(figures)
        reliability.append(bins)
    micro, _ = _binary_figures(p.ravel(), y.ravel(), log_p.ravel(), log_q.ravel(), n_bins)
    return {
        "n": int(p.shape[0]),
        "n_labels": int(p.shape[1]),
        "per_label": per_label,
        "macro": {name: float(np.mean([row[name] for row in per_label])) for name in FIGURES},
        "micro": {name: micro[name] for name in FIGURES},
        "reliability": reliability,
        "conventions": {
            "task": MULTILABEL,
            "probability": "sigmoid of each label's logit (positive-class probability)",
            "ece": f"per label, {n_bins} equal-width bins of the positive-class probability, L1, weighted",
            "nll": "mean binary cross-entropy per label, nats, exact",
            "macro": "unweighted mean over labels",
            "micro": "all (row, label) pairs pooled as one binary problem",
        },
    }


def json_figures(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON null), recursively."""
    if isinstance(value, dict):
        return {key: json_figures(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_figures(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
