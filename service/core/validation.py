"""Checks of logits, probabilities, labels and weights, split from the numerics that use them.

Every check raises :class:`service.errors.InvalidInput` with a message that names the argument, the problem
and the first offending row, so that HTTP and CLI users can fix their data without reading our code.

Conventions
-----------
- Scores are 2-D ``(n_samples, n_classes)``. One column means a binary model: the column is the logit (or the
  probability) of class 1, and labels are in {0, 1}.
- Logits may be any finite real numbers (``+-1e4`` included); probabilities must lie in [0, 1] and, with two
  or more columns, each row must sum to 1 within ``PROBABILITY_SUM_TOLERANCE``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import InvalidInput

PROBABILITY_SUM_TOLERANCE = 1e-3
MAX_ABS_LOGIT = 1e100
"""Largest logit magnitude accepted. Classifiers stay far below it (float32 itself ends at 3.4e38); beyond
about 1e154 the squares in the fits' derivatives overflow float64, and near 1e308 even ``z - max(z)`` does."""
# Elements per block of the probability checks' single pass (1 MiB of float32: the L2 cache of one core).
_SCAN_BLOCK_ELEMENTS = 1 << 18
ARGMAX_MIN_COLUMNS = 13
"""From this many columns on, numpy's argmax along each row beats :func:`scan_narrow`'s transposed blocks."""
# Rows per block of scan_narrow: 16,384 rows x 10 float32 columns is 640 KiB, within one core's L2 cache.
_NARROW_BLOCK_ROWS = 1 << 14
MAX_NUM_CLASSES = 100_000
"""Most classes of a model (``PUT /v1/models``): a softmax row of 100,000 float64 is 800 KB, and every
per-class bound of a method (matrix scaling's ``K``, one-vs-rest curves) is lower than this one."""
SAMPLE_WEIGHT_TOTAL_RANGE = (1e-100, 1e100)
"""Bounds of the sum of ``sample_weight``: weighted sums of losses (up to ~1e100 each) stay finite, and
weighted means keep their precision (a total of 1e-320 is a subnormal with a few significant bits)."""


def _to_numpy(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InvalidInput(f"{name} is not a rectangular numeric array: {exc}", field=name) from None
    return array


def _first_row(mask: np.ndarray) -> int:
    """Index of the first sample (row) where ``mask`` holds."""
    rows = mask.reshape(mask.shape[0], -1).any(axis=1) if mask.ndim > 1 else mask
    return int(np.flatnonzero(rows)[0])


def as_float_matrix(values: Any, name: str, *, finite: bool = True) -> np.ndarray:
    """Return ``values`` as a 2-D float array (float32 or float64 kept, other numbers to float64).

    With ``finite=True`` (the default) NaN and Inf are rejected here; ``finite=False`` leaves that check to
    a caller whose own checks already fail on them.
    """
    array = _to_numpy(values, name)
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        if array.dtype.kind == "O":
            try:
                array = array.astype(np.float64)
            except (ValueError, TypeError, OverflowError):  # OverflowError: a Python int beyond float64
                raise InvalidInput(f"{name} must hold numbers only, got dtype object", field=name) from None
        else:
            raise InvalidInput(f"{name} must hold numbers, got dtype {array.dtype}", field=name)
    if array.ndim != 2:
        raise InvalidInput(
            f"{name} must be 2-D (n_samples, n_classes), got {array.ndim}-D with shape {array.shape}",
            field=name,
        )
    n_samples, n_classes = array.shape
    if n_samples == 0:
        raise InvalidInput(f"{name} is empty: it has no rows", field=name)
    if n_classes == 0:
        raise InvalidInput(f"{name} has fewer than 2 classes: it has 0 columns", field=name)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32 if array.dtype == np.float16 else np.float64)
    if finite:
        _check_finite(array, name)
    return array


def _check_finite(array: np.ndarray, name: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        row = _first_row(~finite)
        raise InvalidInput(f"{name} contains NaN or Inf at row {row}", field=name, row=row)


def check_logits(logits: Any, name: str = "logits", *, scale: bool = False) -> np.ndarray:
    """Validate logits: finite, 2-D, at least one row and one column, at most ``MAX_ABS_LOGIT`` in magnitude.

    A row beyond the limit is refused (InvalidInput naming it), or with ``scale`` (the transforms: every
    finite row gets an answer) scaled into the limit by :func:`scale_into_domain`.
    """
    array = as_float_matrix(logits, name)
    # float32 cannot exceed the limit; max and -min avoid an N x K temporary on the hot path
    if array.dtype == np.float64 and max(array.max(), -array.min()) > MAX_ABS_LOGIT:
        if scale:
            return scale_into_domain(array)
        too_large = np.abs(array) > MAX_ABS_LOGIT
        row = _first_row(too_large)
        raise InvalidInput(
            f"{name} row {row} holds a value of magnitude {np.abs(array[row]).max():.3g}, above the limit of "
            f"{MAX_ABS_LOGIT:g} for logits",
            field=name,
            row=row,
        )
    return array


def scale_into_domain(array: np.ndarray) -> np.ndarray:
    """float64 logits with every row of magnitude above ``MAX_ABS_LOGIT`` scaled by a power of two into it.

    The numpy twin of the exported modules' ``into_domain`` (same formula, same answers). A power of two
    scales exactly, so a row keeps its order and ratios; at that scale two distinct logits of the row differ
    by more than 1e84, so softmax, temperature scaling and the one-vs-rest curves answer the one-hot (or tied)
    row they would answer unscaled, while ``z / T``, ``W z`` or ``z1 - z0`` can no longer overflow. Vector,
    matrix and Platt scaling's biases weigh relatively more after scaling, which can only matter where the
    scaled scores tie.
    """
    magnitude = np.abs(array).max(axis=1)
    outside = magnitude > MAX_ABS_LOGIT
    if not outside.any():
        return array
    scaled = array.copy()
    exponent = np.ceil(np.log2(magnitude[outside] / MAX_ABS_LOGIT))
    scaled[outside] *= np.exp2(-exponent)[:, None]
    return scaled


def check_probabilities(probabilities: Any, name: str = "probabilities") -> np.ndarray:
    """Validate probabilities: finite, in [0, 1], rows summing to 1 when there are two or more columns."""
    return _check_probabilities(probabilities, name, top_label=False)[0]


def check_probabilities_top_label(
    probabilities: Any, name: str = "probabilities"
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`check_probabilities`, with each row's argmax (lowest index on ties) and maximum where cheap.

    Returns ``(probabilities, argmax, maxima)``. The argmax comes out of the validation's own pass over the
    matrix, while each block of rows is in cache: one read of the matrix from memory instead of two
    (measured, 50,000 x 1,000 float32: 34 ms for checks and argmax together, against 22 ms + 25 ms apart).
    Below ``ARGMAX_MIN_COLUMNS`` columns the maxima come with it (:func:`scan_narrow`); from there on they
    are ``None`` (one ``take_along_axis`` away).
    """
    return _check_probabilities(probabilities, name, top_label=True)


def _check_probabilities(
    probabilities: Any, name: str, *, top_label: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    array = as_float_matrix(probabilities, name, finite=False)
    n_samples, n_classes = array.shape
    if top_label and 2 <= n_classes < ARGMAX_MIN_COLUMNS:
        # errstate: NaN, Inf and sums beyond float range are caught by the checks below
        with np.errstate(invalid="ignore", over="ignore"):
            deviation, maxima, argmax, lowest = scan_narrow(array)
        _check_scan(array, name, lowest, maxima.max(), deviation)
        return array, argmax, maxima
    with_argmax = top_label and n_classes >= ARGMAX_MIN_COLUMNS
    argmax = np.empty(n_samples, dtype=np.intp) if with_argmax else None
    # A NaN makes a block's min and max NaN and a row sum NaN, and +-Inf lies outside [0, 1]: the checks
    # below fail on either, so no separate isfinite pass is needed (it cost 40% of the validation time).
    # Row sums: a float32 matrix-vector product is ~6x faster than an axis-1 float64 sum on narrow float32
    # matrices; its rounding (at most ~6e-5 for K <= 1024) is inside the tolerance; wider rows sum in float64.
    ones = np.ones(n_classes, dtype=array.dtype if n_classes <= 1024 else np.float64)
    sums = np.empty(n_samples, dtype=ones.dtype) if n_classes >= 2 else None
    rows_per_block = max(1, _SCAN_BLOCK_ELEMENTS // n_classes)
    n_blocks = -(-n_samples // rows_per_block)
    lowest = np.empty(n_blocks, dtype=array.dtype)
    highest = np.empty(n_blocks, dtype=array.dtype)
    # Cache-sized blocks: min, max, sums (and argmax) read each block from cache after its first touch
    # (measured, 1M x 10: 6 ms blocked against 16 ms for whole-array min, max and sums).
    with np.errstate(invalid="ignore", over="ignore"):
        for block, start in enumerate(range(0, n_samples, rows_per_block)):
            rows = slice(start, start + rows_per_block)
            values = array[rows]
            lowest[block] = values.min()
            highest[block] = values.max()
            if sums is not None:
                np.matmul(values, ones, out=sums[rows])
            if argmax is not None:
                np.argmax(values, axis=1, out=argmax[rows])
    deviation = np.abs(sums - 1.0).max() if sums is not None else None
    _check_scan(array, name, lowest.min(), highest.max(), deviation)
    return array, argmax, None


def scan_narrow(array: np.ndarray) -> tuple[np.floating, np.ndarray, np.ndarray, np.floating]:
    """Largest deviation of a row sum from 1, row maxima, row argmaxes and minimum of a narrow matrix.

    Along rows of a few elements numpy's and torch's reductions pay their set-up per row (1M x 10 float32:
    numpy argmax 44 ms, torch ``max(dim=1)`` 30-40 ms). Each cache-sized block of rows is transposed into
    a reused buffer instead, so that every reduction runs across contiguous columns (all four: ~19 ms).
    The argmax is the lowest column equal to the row maximum: the equality mask weighted by ``K - j`` and
    max-reduced gives ``K - argmax``; it is returned as uint8 (``K < 256``), which indexes and compares
    like any integer array without an 8-byte-per-row copy.
    """
    n_samples, n_classes = array.shape
    rows_per_block = min(n_samples, _NARROW_BLOCK_ROWS)
    columns = np.empty((n_classes, rows_per_block), dtype=array.dtype)
    is_max = np.empty((n_classes, rows_per_block), dtype=np.uint8)
    weights = np.arange(n_classes, 0, -1, dtype=np.uint8)[:, None]
    sums = np.empty(rows_per_block, dtype=array.dtype)
    maxima = np.empty(n_samples, dtype=array.dtype)
    argmax = np.empty(n_samples, dtype=np.uint8)
    n_blocks = -(-n_samples // rows_per_block)
    lowest = np.empty(n_blocks, dtype=array.dtype)
    deviation = np.empty(n_blocks, dtype=array.dtype)
    for block, start in enumerate(range(0, n_samples, rows_per_block)):
        rows = slice(start, start + rows_per_block)
        width = min(rows_per_block, n_samples - start)
        block_columns, block_is_max, block_sums = columns[:, :width], is_max[:, :width], sums[:width]
        np.copyto(block_columns, array[rows].T)
        lowest[block] = block_columns.min()
        np.add.reduce(block_columns, axis=0, out=block_sums)
        block_sums -= 1
        deviation[block] = np.abs(block_sums, out=block_sums).max()
        np.maximum.reduce(block_columns, axis=0, out=maxima[rows])
        np.equal(block_columns, maxima[rows], out=block_is_max.view(np.bool_))
        np.multiply(block_is_max, weights, out=block_is_max)
        np.maximum.reduce(block_is_max, axis=0, out=argmax[rows])
    np.subtract(n_classes, argmax, out=argmax)
    return deviation.max(), maxima, argmax, lowest.min()


def _check_scan(
    array: np.ndarray, name: str, lowest: np.floating, highest: np.floating, deviation: np.floating | None
) -> None:
    """Raise unless the scan's minimum, maximum and largest ``abs(row sum - 1)`` are within bounds."""
    # Written so that NaN fails every comparison
    valid = bool(lowest >= 0.0) and bool(highest <= 1.0)
    if valid and deviation is not None:
        valid = bool(deviation <= PROBABILITY_SUM_TOLERANCE)
    if not valid:
        _diagnose_probabilities(array, name)


def _diagnose_probabilities(array: np.ndarray, name: str) -> None:
    """Raise the error for the first problem of invalid probabilities (the slow path, on failure only)."""
    _check_finite(array, name)
    if array.min() < 0.0 or array.max() > 1.0:
        row = _first_row((array < 0.0) | (array > 1.0))
        raise InvalidInput(f"{name} must lie in [0, 1]: row {row} does not", field=name, row=row)
    if array.shape[1] >= 2:
        ones = np.ones(array.shape[1], dtype=array.dtype if array.shape[1] <= 1024 else np.float64)
        sums = array @ ones
        off = np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE
        if off.any():
            row = _first_row(off)
            raise InvalidInput(
                f"{name} row {row} sums to {sums[row]:.6g}, not 1 (tolerance {PROBABILITY_SUM_TOLERANCE:g})",
                field=name,
                row=row,
            )


def check_scores(scores: Any, *, from_logits: bool) -> np.ndarray:
    """Validate the first argument of a metric as logits or probabilities, as the caller said."""
    return check_logits(scores) if from_logits else check_probabilities(scores)


def n_label_classes(n_columns: int) -> int:
    """Number of classes labels may take for a score matrix with ``n_columns`` columns (1 column: binary)."""
    return 2 if n_columns == 1 else n_columns


def check_labels(labels: Any, n_samples: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Validate integer class labels in ``[0, n_label_classes(n_classes))``, one per sample, as int64.

    Booleans are refused (``true`` is not class 1): a boolean array, or a list or object array holding one.
    """
    if isinstance(labels, list | tuple) and any(type(value) is bool for value in labels):
        row = next(i for i, value in enumerate(labels) if type(value) is bool)
        raise InvalidInput(
            f"{name}[{row}] = {labels[row]!r} is a boolean, not an integer class", field=name, row=row
        )
    array = _to_numpy(labels, name)
    if array.ndim != 1:
        raise InvalidInput(f"{name} must be 1-D, got {array.ndim}-D with shape {array.shape}", field=name)
    if array.shape[0] != n_samples:
        raise InvalidInput(
            f"{name} has {array.shape[0]} entries but the scores have {n_samples} rows", field=name
        )
    if array.dtype == np.bool_:
        raise InvalidInput(f"{name} must be integers, got booleans", field=name)
    if array.dtype.kind == "O":
        boolean = np.frompyfunc(lambda value: isinstance(value, bool | np.bool_), 1, 1)(array).astype(bool)
        if boolean.any():
            row = _first_row(boolean)
            raise InvalidInput(
                f"{name}[{row}] = {array[row]!r} is a boolean, not an integer class", field=name, row=row
            )
    if array.dtype.kind == "f" or array.dtype.kind == "O":
        try:
            as_float = array.astype(np.float64)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(f"{name} must be integers", field=name) from None
        bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
        if bad.any():
            row = _first_row(bad)
            raise InvalidInput(f"{name}[{row}] = {array[row]!r} is not an integer", field=name, row=row)
        array = as_float
    elif array.dtype.kind not in "iu":
        raise InvalidInput(f"{name} must be integers, got dtype {array.dtype}", field=name)
    # Range check before the cast to int64: 1e300 or a uint64 above 2**63 would wrap to a wrong value there.
    k = n_label_classes(n_classes)
    outside = (array < 0) | (array >= k)
    if outside.any():
        row = _first_row(outside)
        shown = array[row] if array.dtype.kind in "iu" else f"{array[row]:g}"
        raise InvalidInput(f"{name}[{row}] = {shown} is outside [0, {k})", field=name, row=row)
    return array.astype(np.int64, copy=False)


def check_sample_weight(sample_weight: Any, n_samples: int, name: str = "sample_weight") -> np.ndarray | None:
    """Validate optional non-negative finite weights, one per sample, summing to a total within
    ``SAMPLE_WEIGHT_TOTAL_RANGE``; float64."""
    if sample_weight is None:
        return None
    array = _to_numpy(sample_weight, name)
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise InvalidInput(f"{name} must hold numbers, got dtype {array.dtype}", field=name)
    array = array.astype(np.float64)
    if array.ndim != 1 or array.shape[0] != n_samples:
        raise InvalidInput(f"{name} must have shape ({n_samples},), got {array.shape}", field=name)
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        row = _first_row(bad)
        raise InvalidInput(f"{name}[{row}] must be finite and >= 0", field=name, row=row)
    low, high = SAMPLE_WEIGHT_TOTAL_RANGE
    # max first: the sum of weights near 1e308 would overflow before it could be compared
    total = array.sum() if array.max(initial=0.0) <= high else np.inf
    if total <= 0:
        raise InvalidInput(f"{name} sums to 0", field=name)
    if not low <= total <= high:
        raise InvalidInput(
            f"{name} sums to {total:g}; the total must lie in [{low:g}, {high:g}]: rescale the weights",
            field=name,
        )
    return array


def check_labelled(
    scores: Any, labels: Any, *, from_logits: bool, sample_weight: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate scores, labels and optional weights together (the common entry of metrics and fits)."""
    array = check_scores(scores, from_logits=from_logits)
    y = check_labels(labels, array.shape[0], array.shape[1])
    w = check_sample_weight(sample_weight, array.shape[0])
    return array, y, w


def check_positive_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Validate an integer option such as ``n_bins``: ``minimum <= value`` (and ``<= maximum`` when given).

    Size-like options have a ``maximum`` (a named constant next to the option, stating the memory or time
    it bounds); the message names it.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InvalidInput(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)
    if maximum is not None and value > maximum:
        raise InvalidInput(
            f"{name} must be at most {maximum:,} (the limit of this option), got {int(value):,}", field=name
        )
    return int(value)


def check_work(amount: int, limit: int, name: str, what: str) -> None:
    """InvalidInput naming ``limit`` when ``amount`` (a product of sizes, e.g. resamples x rows) exceeds it."""
    if amount > limit:
        raise InvalidInput(f"{what} is {amount:,}, above the limit of {limit:,}", field=name)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values."""
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}; got {value!r}", field=name)
    return value


def same_class_count(columns: int, num_classes: int) -> bool:
    """Whether scores with ``columns`` columns fit a model of ``num_classes`` classes.

    One column and two columns both describe a binary model, so either fits ``num_classes`` 1 or 2.
    """
    return n_label_classes(columns) == n_label_classes(num_classes)
