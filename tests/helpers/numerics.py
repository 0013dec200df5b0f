"""Comparisons of floating-point results with tolerances that follow from their dtype, and reference maths.

A float32 reduction (a dot product in a forward pass, a bin sum) is exact only up to the order in which its
terms are added, and that order differs between CPUs (their SIMD kernels), thread counts and devices. Each
addition rounds to half a unit in the last place (ulp) of the running sum, so two correct results differ by a
few ulps *of the magnitude the terms were summed at*, not of the result: a logit near 0 that is the sum of
terms near 40 carries their rounding. The float32 helpers below therefore take a tolerance in ulps
(``EPS32``, relative) of each row's largest magnitude; never an absolute number that only holds for the values
one machine happened to produce.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 = 1.19e-7: one ulp of float32, relative to the value
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52 = 2.2e-16


def _row_scale(values: np.ndarray) -> np.ndarray:
    """The largest magnitude along the last axis (kept for broadcasting); the value itself for a scalar."""
    magnitude = np.abs(values)
    scale = magnitude.max(axis=-1, keepdims=True) if values.ndim else magnitude
    return np.maximum(scale, np.finfo(np.float32).tiny)


def float32_tolerance(expected, *, ulps: float, scale=None) -> np.ndarray:
    """Absolute tolerance of each element: ``ulps`` float32 ulps of ``scale`` (by default the largest magnitude
    in the element's row of ``expected``)."""
    if scale is None:
        scale = _row_scale(np.asarray(expected, dtype=np.float64))
    return ulps * EPS32 * np.asarray(scale, dtype=np.float64)


def _assert_within(actual: np.ndarray, expected: np.ndarray, tolerance: np.ndarray, what: str, err_msg: str):
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape} {err_msg}"
    error = np.abs(actual - expected)
    bad = ~(error <= tolerance)  # NaN in either is a mismatch
    if bad.any():
        ratio = np.where(tolerance > 0, error / tolerance, np.inf)
        worst = np.unravel_index(np.nanargmax(np.where(bad, ratio, -np.inf)), actual.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements out of tolerance; worst at {tuple(map(int, worst))}:"
            f" actual {actual[worst]!r}, expected {expected[worst]!r}, |difference| {error[worst]:.3g} >"
            f" tolerance {np.broadcast_to(tolerance, error.shape)[worst]:.3g} {err_msg}"
        )


def assert_float32_close(actual, expected, *, ulps: float, scale=None, err_msg: str = "") -> None:
    """``actual`` equals ``expected`` (float32 results, e.g. logits) up to ``ulps`` float32 ulps of each row's
    largest magnitude: ``|actual - expected| <= ulps * EPS32 * max|expected row|`` elementwise. ``scale``
    (broadcast against the values) replaces that magnitude where the terms were larger than the results, e.g.
    ``sum(|x|)`` for ``sum(x)``.

    Choose ``ulps`` from the computation: about the square root of the accumulation length for the typical
    rounding of a sum, times a margin; a wrong model or a wrong row is off by orders of magnitude more.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    tolerance = float32_tolerance(expected, ulps=ulps, scale=scale)
    _assert_within(actual, expected, tolerance, f"float32 within {ulps} ulps", err_msg)


def assert_softmax_close(
    actual, expected, logits, *, ulps: float, temperature: float = 1.0, err_msg: str = ""
) -> None:
    """Probabilities computed from logits that agree with ``logits`` up to :func:`assert_float32_close`'s
    tolerance (``ulps``), divided by ``temperature``, agree with ``expected`` up to what that moves them.

    With ``p = softmax(z / T)``, ``d log p_k = (dz_k - sum_j p_j dz_j) / T``, so ``|dz| <= delta`` moves
    ``log p_k`` by at most ``2 delta / T``: each probability within ``p_k * expm1(2 delta / T)`` (relative:
    small probabilities stay as exact as large ones), plus a float64 rounding floor.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    delta = float32_tolerance(logits, ulps=ulps) / temperature
    tolerance = np.abs(expected) * np.expm1(2.0 * delta) + 8 * EPS64
    _assert_within(actual, expected, tolerance, f"softmax of float32 logits within {ulps} ulps", err_msg)


def softmax_t(logits, temperature: float = 1.0) -> np.ndarray:
    """Reference softmax(z / T), computed in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
