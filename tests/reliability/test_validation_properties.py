"""Hostile arrays through the numerical core: a correct result or the documented InvalidInput, nothing else.

Every public entry that takes user arrays (metrics, losses, each calibrator's fit and transform) gets
arbitrary shapes (0-D to 3-D, N = 0 or 1, K = 0 or 1), dtypes (int, uint64, bool, float16/32/64, object
holding numbers, strings, None or huge Python ints), NaN and Inf anywhere, and magnitudes from subnormal to
1.8e308. The property: the call raises :class:`InvalidInput` or returns a result that holds what the
function promises (probabilities finite, in [0, 1], rows summing to 1, argmax kept by temperature scaling;
metrics finite and in range, equal to a plain float64 reference). Any other exception, and any numpy
RuntimeWarning (overflow, invalid cast) on the way, fails the test.

Found here (fixed in service/core/validation.py): labels of 1e300 or a uint64 above 2**63 were cast to int64
first, which wrapped them (a RuntimeWarning and a wrong value in the message); logits near 1.8e308 passed
validation and came out of every metric and calibrator as NaN; an object array holding a Python int beyond
float64 raised OverflowError instead of InvalidInput.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import log_softmax as reference_log_softmax

from service.core import calibrators, losses, metrics
from service.core.validation import MAX_ABS_LOGIT, check_labels, check_logits, check_probabilities
from service.errors import InvalidInput

QUICK_EXAMPLES, SOAK_EXAMPLES = 120, 2000
METHODS = tuple(calibrators.CALIBRATORS)

# Values chosen to sit on the edges: subnormals, float16/float32 limits, the logit bound, float64's end.
EDGE_FLOATS = [
    0.0,
    -0.0,
    5e-324,
    1e-300,
    1e-8,
    0.5,
    1.0,
    -1.0,
    1e4,
    -1e4,
    65504.0,
    3.4e38,
    -3.4e38,
    MAX_ABS_LOGIT,
    -MAX_ABS_LOGIT,
    1e154,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    float("nan"),
    float("inf"),
    float("-inf"),
]


def shapes() -> st.SearchStrategy[tuple[int, ...]]:
    matrix = st.tuples(st.integers(0, 7), st.integers(0, 5))
    return st.one_of(matrix, matrix, matrix, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))


@st.composite
def numeric_arrays(draw, shape: tuple[int, ...] | None = None) -> np.ndarray:
    shape = draw(shapes()) if shape is None else shape
    dtype = draw(
        st.sampled_from(
            [np.float64, np.float64, np.float32, np.float16, np.int64, np.int8, np.uint64, np.bool_]
        )
    )
    if np.dtype(dtype).kind == "f":
        elements = st.one_of(
            st.sampled_from(EDGE_FLOATS),
            st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dtype).itemsize * 8),
            st.floats(-20, 20, width=np.dtype(dtype).itemsize * 8),
        )
        with warnings.catch_warnings():  # the cast of 1e308 to float16 overflows to inf: that is the input
            warnings.simplefilter("ignore", RuntimeWarning)
            return draw(hnp.arrays(dtype, shape, elements=elements.map(lambda v: np.array(v).astype(dtype))))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def object_arrays(draw, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """What a JSON or CSV reader can hand over: lists of Python numbers, strings, None, huge ints."""
    shape = draw(shapes()) if shape is None else shape
    element = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-5, 5),
        st.sampled_from([10**400, -(10**400), 2**64 + 1, True, None, "1", "x", "nan"]),
    )
    size = int(np.prod(shape))
    values = draw(st.lists(element, min_size=size, max_size=size))
    array = np.empty(size, dtype=object)
    array[:] = values
    return array.reshape(shape)


def any_arrays(shape: tuple[int, ...] | None = None) -> st.SearchStrategy[np.ndarray]:
    return st.one_of(numeric_arrays(shape), numeric_arrays(shape), object_arrays(shape))


@st.composite
def plausible_scores(draw) -> np.ndarray:
    """Well-formed float matrices (N, K >= 1) whose values may still hit the edges: the accepted path."""
    shape = (draw(st.integers(1, 8)), draw(st.integers(1, 4)))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    width = np.dtype(dtype).itemsize * 8
    moderate = st.floats(-30, 30, width=width)
    edge = st.sampled_from([0.0, 5e-324, 1e-8, 1e4, -1e4, 6e4, -6e4, 1e38, -1e38, MAX_ABS_LOGIT, 1e101])
    values = st.one_of(moderate, moderate, moderate, edge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return draw(hnp.arrays(dtype, shape, elements=values.map(lambda v: np.array(v).astype(dtype))))


@st.composite
def labelled(draw) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores, labels and weights: about half well-formed (so the numerics run), half hostile somewhere."""
    hostile = draw(st.sampled_from(["none", "none", "none", "scores", "labels", "weights", "lengths"]))
    scores = draw(any_arrays() if hostile == "scores" else plausible_scores())
    n = scores.shape[0] if scores.ndim >= 1 else 0
    k = scores.shape[1] if scores.ndim == 2 else 2
    n_labels = draw(st.sampled_from([n + 1, max(n - 1, 0)])) if hostile == "lengths" else n
    in_range = hnp.arrays(np.int64, n_labels, elements=st.integers(0, max(k - 1, 1)))
    labels = draw(
        st.one_of(
            hnp.arrays(np.int64, n_labels, elements=st.integers(-1, max(k, 2))), any_arrays((n_labels,))
        )
        if hostile == "labels"
        else in_range
    )
    valid_weights = st.one_of(
        st.none(), st.none(), hnp.arrays(np.float64, n, elements=st.floats(0, 10) | st.just(1e-90))
    )
    hostile_weights = st.one_of(
        hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0, 1e308, 5e-324, -1.0, np.nan])),
        any_arrays((n,)),
    )
    weights = draw(hostile_weights if hostile == "weights" else valid_weights)
    return scores, labels, weights


def strict(call):
    """Run ``call`` with numpy's RuntimeWarnings as errors; InvalidInput means a refusal (returns None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            return call()
        except InvalidInput:
            return None


def reference_logits(scores) -> np.ndarray:
    """Two-column float64 logits as the core defines them (one column z is the binary logit (0, z))."""
    z = np.asarray(scores, dtype=np.float64)
    return np.column_stack([np.zeros(len(z)), z[:, 0]]) if z.shape[1] == 1 else z


def assert_probabilities(p: np.ndarray, n: int, k: int) -> None:
    assert p.shape == (n, max(k, 2)) and p.dtype == np.float64
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)


def check_logit_and_probability_checks(scores):
    for check in (check_logits, check_probabilities):
        checked = strict(lambda check=check: check(scores))
        if checked is None:
            continue
        assert checked.ndim == 2 and checked.shape[0] >= 1 and checked.shape[1] >= 1
        assert checked.dtype in (np.float32, np.float64) and np.isfinite(checked).all()
        np.testing.assert_array_equal(checked, np.asarray(scores, dtype=checked.dtype))
        if check is check_logits:
            assert np.abs(checked.astype(np.float64)).max() <= MAX_ABS_LOGIT


def check_label_check(labels, n_classes):
    n = labels.shape[0] if labels.ndim == 1 else 1
    checked = strict(lambda: check_labels(labels, n, n_classes))
    if checked is None:
        return
    assert checked.dtype == np.int64 and checked.shape == (n,)
    assert ((checked >= 0) & (checked < max(n_classes, 2))).all()
    np.testing.assert_array_equal(checked, np.asarray(labels).astype(np.float64))


def check_metrics_give_a_figure_in_range_or_invalid_input(data, from_logits):
    scores, labels, weights = data
    report = strict(
        lambda: metrics.calibration_report(scores, labels, from_logits=from_logits, sample_weight=weights)
    )
    if report is None:
        return
    for name in ("ece", "mce", "ece_l2", "ece_mass", "ece_classwise", "ece_debiased"):
        assert 0.0 <= report[name] <= 1.0 + 1e-12, (name, report[name])
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["brier"] <= 2.0 + 1e-12
    assert report["nll"] >= 0.0 and not np.isnan(report["nll"])
    if from_logits:
        assert np.isfinite(report["nll"])
        y = np.asarray(labels).astype(np.float64).astype(np.int64)
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        log_p = reference_log_softmax(reference_logits(scores), axis=1)
        expected_nll = -np.sum(w * log_p[np.arange(len(y)), y]) / w.sum()
        np.testing.assert_allclose(report["nll"], expected_nll, rtol=1e-6, atol=1e-9)


def check_evaluation_losses_are_finite_or_invalid_input(data):
    scores, labels, weights = data
    figures = strict(lambda: losses.evaluation_losses(scores, labels, sample_weight=weights))
    if figures is None:
        return
    for name, value in figures.items():
        assert np.isfinite(value) and value >= -1e-12, (name, value)


def check_calibrators_fit_and_transform_or_invalid_input(data, method, unseen):
    scores, labels, weights = data
    calibrator = calibrators.make_calibrator(method)
    fitted = strict(lambda: calibrator.fit(scores, labels, sample_weight=weights))
    if fitted is None:
        with pytest.raises(InvalidInput, match="not fitted"):
            calibrator.transform(np.zeros((1, 2)))
        return
    z = np.asarray(scores)
    probabilities = strict(lambda: fitted.transform(scores))
    assert probabilities is not None, "a fitted calibrator refused its own training logits"
    assert_probabilities(probabilities, z.shape[0], z.shape[1])
    if method == "temperature":
        logits = reference_logits(scores)
        distinct = np.sort(logits, axis=1)
        clear = distinct[:, -1] - distinct[:, -2] > 1e-9 * np.maximum(1.0, np.abs(distinct[:, -1]))
        np.testing.assert_array_equal(probabilities.argmax(1)[clear], logits.argmax(1)[clear])
    restored = calibrators.calibrator_from_dict(fitted.to_dict())
    np.testing.assert_allclose(restored.transform(scores), probabilities, rtol=1e-12, atol=1e-15)
    other = strict(lambda: fitted.transform(unseen))
    if other is not None:
        assert_probabilities(other, unseen.shape[0], unseen.shape[1])


# ---------------------------------------------------------------------------------------- the test pairs


def property_pair(check, **strategies):
    """The same property twice: a quick run for ``make test`` and a long one, marked slow, for ``make soak``."""

    def variant(examples: int):
        return settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(given(**strategies)(check))

    return variant(QUICK_EXAMPLES), pytest.mark.slow(variant(SOAK_EXAMPLES))


test_logit_and_probability_checks, test_logit_and_probability_checks_soak = property_pair(
    check_logit_and_probability_checks, scores=any_arrays()
)
test_label_check, test_label_check_soak = property_pair(
    check_label_check, labels=any_arrays(), n_classes=st.integers(1, 4)
)
(
    test_metrics_give_a_figure_in_range_or_invalid_input,
    test_metrics_give_a_figure_in_range_or_invalid_input_soak,
) = property_pair(
    check_metrics_give_a_figure_in_range_or_invalid_input, data=labelled(), from_logits=st.booleans()
)
(
    test_evaluation_losses_are_finite_or_invalid_input,
    test_evaluation_losses_are_finite_or_invalid_input_soak,
) = property_pair(check_evaluation_losses_are_finite_or_invalid_input, data=labelled())
(
    test_calibrators_fit_and_transform_or_invalid_input,
    test_calibrators_fit_and_transform_or_invalid_input_soak,
) = property_pair(
    check_calibrators_fit_and_transform_or_invalid_input,
    data=labelled(),
    method=st.sampled_from(METHODS),
    unseen=any_arrays(),
)
