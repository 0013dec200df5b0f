"""Statistical tests of calibration: Spiegelhalter, cumulative-difference KS and Kuiper, Cox, Hosmer-Lemeshow, ICI.

Every public function takes ``(confidences, outcomes)``: a forecast probability ``c_i`` in [0, 1] and the
binary outcome ``o_i`` in {0, 1} it forecasts. For a classifier's top-label calibration, ``c_i`` is the
largest probability of row ``i`` and ``o_i = 1[argmax_i = y_i]`` (:func:`top_label_tests` in
:mod:`service.core.metrics`' report does exactly that). Inputs are validated by :func:`check_forecasts`; the
numerics run in private ``_..._compute`` helpers on plain float64 arrays. All tests are unweighted.

Under the null hypothesis of perfect calibration, ``P(o_i = 1 | c_i) = c_i``; every p-value here is the
probability, under that null, of a statistic at least as extreme as the observed one (asymptotic
distributions, as in the references).

Figures (the names of :func:`calibration_tests`):

- ``spiegelhalter_z``, ``spiegelhalter_p``: Spiegelhalter's Z and its **two-sided** normal p-value.
- ``ks_calibration``, ``ks_calibration_p``, ``kuiper_calibration``, ``kuiper_calibration_p``: the
  Kolmogorov-Smirnov (maximum absolute) and Kuiper (range) statistics of the cumulative differences sorted by
  confidence (Arrieta-Ibarra et al. 2022), as MAPIE's ``mapie.metrics.calibration`` defines them.
- ``calibration_slope`` (``_se``), ``calibration_intercept`` (``_se``): Cox's logistic recalibration.
- ``hosmer_lemeshow``, ``hosmer_lemeshow_p``: Hosmer-Lemeshow C statistic, chi-square with ``G``
  degrees of freedom (``G - 2`` on request, for a development sample).
- ``ici``, ``e50``, ``e90``: Austin and Steyerberg's integrated calibration index of a lowess calibration
  curve.

References
----------
.. [1] Spiegelhalter (1986). "Probabilistic prediction in patient management and clinical trials."
       Statistics in Medicine 5(5):421-433.
.. [2] Arrieta-Ibarra, Gujral, Tannen, Tygert, Xu (2022). "Metrics of calibration for probabilistic
       predictions." JMLR 23:1-54.
.. [3] Tygert (2022). "Calibration of P-values for calibration and for deviation of a subpopulation from the
       full population." arXiv:2202.00100.
.. [4] Cox (1958). "Two further applications of a model for binary regression." Biometrika 45:562-565.
.. [5] Hosmer, Lemeshow (1980). "Goodness of fit tests for the multiple logistic regression model."
       Communications in Statistics A 9(10):1043-1069; Hosmer, Lemeshow, Sturdivant (2013). "Applied
       Logistic Regression", 3rd ed., Wiley, section 5.2.2.
.. [6] Austin, Steyerberg (2019). "The Integrated Calibration Index (ICI) and related metrics for
       quantifying the calibration of logistic regression models." Statistics in Medicine 38:4051-4065.
.. [7] Cleveland (1979). "Robust locally weighted regression and smoothing scatterplots." JASA 74:829-836.
.. [8] Feller (1951). "The asymptotic distribution of the range of sums of independent random variables."
       Annals of Mathematical Statistics 22(3):427-432.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

# scipy.special's distribution functions, not scipy.stats (the same ndtr and chdtrc underneath): importing
# scipy.stats costs a serving worker 0.6 s and 45 MiB at start for four tail probabilities
from scipy.special import chdtrc, ndtr

from service.core.validation import check_positive_int
from service.errors import InvalidInput

__all__ = [
    "CALIBRATION_TEST_FIGURES",
    "CONVENTIONS",
    "P_VALUES",
    "CoxCalibration",
    "calibration_slope_intercept",
    "calibration_tests",
    "check_forecasts",
    "cumulative_calibration_tests",
    "hosmer_lemeshow",
    "integrated_calibration_index",
    "kolmogorov_smirnov_sf",
    "kuiper_sf",
    "lowess",
    "spiegelhalter",
]


def _normal_sf(x: Any) -> Any:
    """The standard normal's upper tail ``P(Z > x)`` (``scipy.stats.norm.sf``)."""
    return ndtr(-np.asarray(x, dtype=np.float64))


CALIBRATION_TEST_FIGURES = (
    "spiegelhalter_z",
    "spiegelhalter_p",
    "ks_calibration",
    "ks_calibration_p",
    "kuiper_calibration",
    "kuiper_calibration_p",
    "calibration_slope",
    "calibration_slope_se",
    "calibration_intercept",
    "calibration_intercept_se",
    "hosmer_lemeshow",
    "hosmer_lemeshow_p",
    "ici",
    "e50",
    "e90",
)
P_VALUES = {
    "spiegelhalter_p": ("Spiegelhalter's Z test", "spiegelhalter_z"),
    "ks_calibration_p": ("Kolmogorov-Smirnov test of the cumulative calibration curve", "ks_calibration"),
    "kuiper_calibration_p": ("Kuiper test of the cumulative calibration curve", "kuiper_calibration"),
    "hosmer_lemeshow_p": ("Hosmer-Lemeshow test", "hosmer_lemeshow"),
}
"""Each p-value figure: ``(the test's name, the figure of its statistic)``."""
DEFAULT_HL_GROUPS = 10
LOWESS_FRACTION = 2.0 / 3.0
LOWESS_EXACT_MAX = 10_000
"""Most points of an exact lowess; beyond, consecutive confidences are pooled into this many groups first
(:func:`lowess`)."""
COX_CLIP = 1e-12
"""Confidences are clipped to ``[COX_CLIP, 1 - COX_CLIP]`` before their logit in Cox's regression."""
LOWESS_ANCHORS = 2_000
"""Points at which the ICI's lowess is fitted exactly (evenly spread in rank); linear interpolation between
them, as R's ``lowess(delta=)`` does (its default spaces them 1 % of the range apart)."""
_LOWESS_CHUNK_ELEMENTS = 1 << 22  # rows x columns of one block of lowess weights (32 MiB of float64)

CONVENTIONS = {
    "calibration_tests": "top-label confidence c against o = 1[argmax = label], unweighted; a figure is "
    "left out where it is undefined (e.g. every outcome equal, or a sample weight given)",
    "spiegelhalter": "z = sum (o - c)(1 - 2c) / sqrt(sum (1 - 2c)^2 c (1 - c)), two-sided normal p-value",
    "ks_calibration": "max |S_k| / sigma, S_k = (1/N) sum_{i<=k} (o - c) sorted by c, "
    "sigma = sqrt(sum c (1 - c)) / N; p from sup |Brownian motion| on [0, 1] (Arrieta-Ibarra et al. 2022)",
    "kuiper_calibration": "(max S_k - min S_k) / sigma, same S and sigma; p from the range of Brownian "
    "motion on [0, 1] (Feller 1951)",
    "calibration_slope": "Cox: logistic regression o ~ a + b logit(c), c clipped to [1e-12, 1 - 1e-12]; "
    "slope b, intercept a (joint fit), standard errors from the observed information",
    "hosmer_lemeshow": "10 groups of equal count by sorted confidence, "
    "sum_g (O_g - E_g)^2 / (E_g (1 - E_g / n_g)), chi-square with G degrees of freedom (forecasts not "
    "fitted on these data; G - 2 is for a development sample)",
    "ici": "mean |f(c) - c|, f a lowess of o on c (tricube, span 2/3, local linear, no robustness "
    "iterations; fitted at 2,000 anchors evenly spread in rank and interpolated linearly, on 10,000 "
    "pooled groups of equal count above 10,000 samples); e50, e90: median and 90th "
    "percentile (linear interpolation) of |f(c) - c|",
}


# ------------------------------------------------------------------------------------------ validation


def check_forecasts(confidences: Any, outcomes: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(c, o)`` as 1-D float64 arrays of equal length, ``c`` in [0, 1] and ``o`` in {0, 1}.

    Raises :class:`InvalidInput` naming the first offending sample.
    """
    c = np.asarray(confidences, dtype=np.float64)
    o = np.asarray(outcomes)
    if c.ndim != 1 or o.ndim != 1:
        raise InvalidInput("confidences and outcomes must be 1-D arrays", field="confidences")
    if c.shape[0] != o.shape[0]:
        raise InvalidInput(
            f"confidences has {c.shape[0]} samples but outcomes has {o.shape[0]}", field="outcomes"
        )
    if c.shape[0] == 0:
        raise InvalidInput("confidences is empty", field="confidences")
    bad = ~((c >= 0.0) & (c <= 1.0))  # NaN fails both comparisons
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidInput(
            f"confidences[{row}] = {c[row]} is not a probability in [0, 1]", field="confidences"
        )
    o = o.astype(np.float64) if o.dtype != np.float64 else o
    bad = (o != 0.0) & (o != 1.0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidInput(f"outcomes[{row}] = {o[row]} is not 0 or 1", field="outcomes")
    return c, o


# ------------------------------------------------------------------------------------------ Spiegelhalter


def spiegelhalter(confidences: Any, outcomes: Any) -> tuple[float, float]:
    """Spiegelhalter's Z test of calibration: ``(z, two-sided p-value)``.

    .. math::

        Z = \\frac{\\sum_i (o_i - c_i)(1 - 2 c_i)}{\\sqrt{\\sum_i (1 - 2 c_i)^2 c_i (1 - c_i)}},
        \\qquad p = 2 \\, \\bar\\Phi(|Z|).

    ``Z`` is the standardised Brier score: ``sum (o - c)^2`` has mean ``sum c(1 - c)`` and the variance in
    the denominator under the null. ``Z`` equals MAPIE's ``spiegelhalter_statistic``; MAPIE's
    ``spiegelhalter_p_value`` is one-sided (``1 - Phi(Z)``), ours is two-sided: a score may be miscalibrated
    either way. NaN where the denominator is 0 (every ``c`` in {0, 1/2, 1}).

    References: Spiegelhalter (1986).
    """
    c, o = check_forecasts(confidences, outcomes)
    return _spiegelhalter_compute(c, o)


def _spiegelhalter_compute(c: np.ndarray, o: np.ndarray) -> tuple[float, float]:
    slope = 1.0 - 2.0 * c
    variance = float(np.sum(slope * slope * c * (1.0 - c)))
    numerator = float(np.sum((o - c) * slope))
    if not variance > 0.0:
        return math.nan, math.nan
    z = numerator / math.sqrt(variance)
    return z, float(2.0 * _normal_sf(abs(z)))


# ------------------------------------------------------------------------------ cumulative differences


def kolmogorov_smirnov_sf(x: float) -> float:
    """``P(sup_{t in [0,1]} |B(t)| > x)`` for a standard Brownian motion ``B``.

    Two exact series, each used where it converges fast and without cancellation:

    - ``x < 1``: ``1 - (2/pi) sum_k (-1)^k / (k + 1/2) exp(-(k + 1/2)^2 pi^2 / (2 x^2))`` (the CDF series
      of MAPIE's ``kolmogorov_smirnov_cdf``, Darling and Siegert 1953);
    - ``x >= 1``: ``4 sum_{k>=0} (-1)^k Phi_bar((2k + 1) x)`` (reflection principle), accurate in the far
      tail where ``1 - CDF`` would round to 0.
    """
    if not x > 0.0:
        return 1.0 if x == x else math.nan
    if x < 1.0:
        k = np.arange(0, 64)
        kplus = k + 0.5
        cdf = 2.0 / math.pi * np.sum((-1.0) ** k / kplus * np.exp(-(kplus**2) * math.pi**2 / (2 * x * x)))
        return float(1.0 - cdf)
    k = np.arange(0, math.ceil(40.0 / x) + 1)
    return float(min(1.0, 4.0 * np.sum((-1.0) ** k * _normal_sf((2 * k + 1) * x))))


def kuiper_sf(x: float) -> float:
    """``P(max_t B(t) - min_t B(t) > x)`` on ``t in [0, 1]`` for a standard Brownian motion ``B``.

    - ``x < 1``: ``1 - sum_{k>=0} (8/x^2 + 2/((k + 1/2)^2 pi^2)) exp(-2 (k + 1/2)^2 pi^2 / x^2)`` (the CDF
      series of MAPIE's ``kuiper_cdf``);
    - ``x >= 1``: ``8 sum_{k>=1} (-1)^(k-1) k Phi_bar(k x)``, the integral of Feller's (1951) density of the
      range ``8 sum_k (-1)^(k-1) k^2 phi(k r)``.
    """
    if not x > 0.0:
        return 1.0 if x == x else math.nan
    if x < 1.0:
        k = np.arange(0, 64)
        kplus = k + 0.5
        terms = (8.0 / x**2 + 2.0 / (kplus**2 * math.pi**2)) * np.exp(-2.0 * kplus**2 * math.pi**2 / x**2)
        return float(1.0 - np.sum(terms))
    k = np.arange(1, math.ceil(40.0 / x) + 2)
    return float(min(1.0, 8.0 * np.sum((-1.0) ** (k - 1) * k * _normal_sf(k * x))))


def cumulative_calibration_tests(confidences: Any, outcomes: Any) -> dict[str, float]:
    """Kolmogorov-Smirnov and Kuiper tests of the cumulative differences sorted by confidence.

    With the samples sorted by increasing ``c`` (a stable sort: ties keep their input order),

    .. math::

        S_k = \\frac{1}{N} \\sum_{i \\le k} (o_i - c_i), \\qquad
        \\sigma = \\frac{1}{N} \\sqrt{\\sum_i c_i (1 - c_i)},

        KS = \\max_k |S_k| / \\sigma, \\qquad Kuiper = (\\max_k S_k - \\min_k S_k) / \\sigma.

    Under perfect calibration ``S / sigma`` is asymptotically a standard Brownian motion on [0, 1], so the
    p-values are :func:`kolmogorov_smirnov_sf` and :func:`kuiper_sf` of the statistics.

    These are MAPIE's ``kolmogorov_smirnov_statistic`` / ``_p_value`` and ``kuiper_statistic`` /
    ``_p_value`` (``mapie.metrics.calibration``, MAPIE 1.x) with one difference: MAPIE breaks ties by
    jittering the scores (relative noise 1e-8 from a seeded generator, the jittered scores then entering the
    sums); we sort deterministically and use the scores as given. Without ties the figures agree to the
    jitter's effect (about 1e-8 relative). Note MAPIE's ``min`` is over the partial sums only, not 0:
    ``Kuiper`` is the range of ``S_1..S_N``. NaN where ``sigma = 0`` (every ``c`` in {0, 1}).

    Returns ``{"ks_calibration", "ks_calibration_p", "kuiper_calibration", "kuiper_calibration_p"}``.

    References: Arrieta-Ibarra et al. (2022); Tygert (2022); Feller (1951).
    """
    c, o = check_forecasts(confidences, outcomes)
    return _cumulative_compute(c, o)


def _cumulative_compute(c: np.ndarray, o: np.ndarray) -> dict[str, float]:
    n = c.shape[0]
    order = np.argsort(c, kind="stable")
    partial = np.cumsum(o[order] - c[order]) / n
    sigma = math.sqrt(float(np.sum(c * (1.0 - c)))) / n
    if not sigma > 0.0:
        return {
            name: math.nan
            for name in ("ks_calibration", "ks_calibration_p", "kuiper_calibration", "kuiper_calibration_p")
        }
    ks = float(np.max(np.abs(partial))) / sigma
    kuiper = float(np.max(partial) - np.min(partial)) / sigma
    return {
        "ks_calibration": ks,
        "ks_calibration_p": kolmogorov_smirnov_sf(ks),
        "kuiper_calibration": kuiper,
        "kuiper_calibration_p": kuiper_sf(kuiper),
    }


# ------------------------------------------------------------------------------------------------ Cox


class CoxCalibration(NamedTuple):
    """Cox's recalibration fit ``logit P(o = 1) = intercept + slope * logit(c)``."""

    slope: float
    slope_se: float
    intercept: float
    intercept_se: float
    converged: bool


def calibration_slope_intercept(confidences: Any, outcomes: Any, *, max_iter: int = 100) -> CoxCalibration:
    """Cox's calibration slope and intercept, with standard errors.

    The maximum-likelihood logistic regression of ``o`` on ``x = logit(c)``, with ``c`` clipped to
    ``[1e-12, 1 - 1e-12]`` first (:data:`COX_CLIP`; a confidence of exactly 0 or 1 has no finite logit):

    .. math::

        P(o_i = 1) = \\sigma(a + b x_i), \\qquad
        I = \\sum_i p_i (1 - p_i) \\begin{pmatrix} 1 & x_i \\\\ x_i & x_i^2 \\end{pmatrix},

    fitted by Newton's method from ``(a, b) = (0, 1)`` (the perfectly calibrated answer; step halving where
    the log-likelihood would fall). The standard errors are the square roots of the diagonal of ``I^-1``
    (observed = expected information for the canonical link). Perfect calibration is ``b = 1, a = 0``;
    ``b < 1`` means over-confident scores (too extreme), ``b > 1`` under-confident ones. ``a`` is the
    intercept of this joint fit, not the calibration-in-the-large intercept of a fit with offset
    ``logit(c)``. Where no finite maximum exists (every outcome equal, perfect separation) the answer has
    ``converged=False`` and NaN figures.

    References: Cox (1958).
    """
    c, o = check_forecasts(confidences, outcomes)
    max_iter = check_positive_int(max_iter, "max_iter")
    return _cox_compute(c, o, max_iter)


def _log_likelihood(eta: np.ndarray, o: np.ndarray) -> float:
    # log sigma(eta) = -log(1 + exp(-eta)), stable through logaddexp
    return float(-np.sum(o * np.logaddexp(0.0, -eta) + (1.0 - o) * np.logaddexp(0.0, eta)))


def _cox_compute(c: np.ndarray, o: np.ndarray, max_iter: int = 100) -> CoxCalibration:
    nan = CoxCalibration(math.nan, math.nan, math.nan, math.nan, False)
    if o.min() == o.max():
        return nan
    clipped = np.clip(c, COX_CLIP, 1.0 - COX_CLIP)
    x = np.log(clipped) - np.log1p(-clipped)
    beta = np.array([0.0, 1.0])
    loglik = _log_likelihood(beta[0] + beta[1] * x, o)
    converged = False
    for _ in range(max_iter):
        eta = beta[0] + beta[1] * x
        p = 0.5 * (1.0 + np.tanh(0.5 * eta))  # sigma(eta), no overflow
        w = p * (1.0 - p)
        residual = o - p
        gradient = np.array([residual.sum(), residual @ x])
        wx = w * x
        information = np.array([[w.sum(), wx.sum()], [wx.sum(), wx @ x]])
        try:
            step = np.linalg.solve(information, gradient)
        except np.linalg.LinAlgError:
            return nan
        scale = 1.0
        for _halving in range(50):
            candidate = beta + scale * step
            new = _log_likelihood(candidate[0] + candidate[1] * x, o)
            if new >= loglik - 1e-12 * abs(loglik):
                break
            scale *= 0.5
        beta, loglik = candidate, new
        if np.all(np.abs(scale * step) <= 1e-10 * (1.0 + np.abs(beta))):
            converged = True
            break
    if not converged or not np.all(np.isfinite(beta)) or abs(beta[1]) > 1e6:
        return nan
    eta = beta[0] + beta[1] * x
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))
    w = p * (1.0 - p)
    wx = w * x
    information = np.array([[w.sum(), wx.sum()], [wx.sum(), wx @ x]])
    try:
        covariance = np.linalg.inv(information)
    except np.linalg.LinAlgError:
        return nan
    return CoxCalibration(
        slope=float(beta[1]),
        slope_se=float(math.sqrt(max(covariance[1, 1], 0.0))),
        intercept=float(beta[0]),
        intercept_se=float(math.sqrt(max(covariance[0, 0], 0.0))),
        converged=True,
    )


# ------------------------------------------------------------------------------------- Hosmer-Lemeshow


def hosmer_lemeshow(
    confidences: Any, outcomes: Any, *, n_groups: int = DEFAULT_HL_GROUPS, fitted: bool = False
) -> tuple[float, float]:
    """Hosmer-Lemeshow C statistic and its p-value: ``(statistic, p)``.

    The samples, sorted by confidence (stable sort), are cut into ``G = n_groups`` consecutive groups of
    equal count (``numpy.array_split``: sizes differ by at most one; ties may fall in two groups). With
    ``n_g`` samples, ``O_g = sum o`` and ``E_g = sum c`` in group ``g``:

    .. math::

        C = \\sum_g \\frac{(O_g - E_g)^2}{E_g (1 - E_g / n_g)}, \\qquad p = P(\\chi^2_{d} > C).

    Degrees of freedom ``d``: ``G`` by default, ``G - 2`` with ``fitted=True``. Hosmer and Lemeshow's
    ``G - 2`` is for the *development* sample, the data a logistic model's two parameters were fitted on;
    for forecasts assessed on data they were not fitted on (an evaluation set, a CI gate) ``C`` is
    asymptotically ``chi2_G`` (Hosmer, Lemeshow, Sturdivant 2013, section 5.2.2), and ``G - 2`` rejects a
    perfectly calibrated forecaster about 11 % of the time at the 5 % level (``P(chi2_10 > 15.51)``; measured
    here: 9-12 % over 400 draws, against 4-6 % with ``G``).

    (Summing over both outcome cells, events and non-events, gives the same number.) A group whose expected
    variance is 0 (every ``c`` in it 0 or 1) adds 0 when ``O_g = E_g`` and makes ``C`` infinite otherwise.
    NaN with fewer samples than groups; ``G`` must be at least 3.

    References: Hosmer and Lemeshow (1980).
    """
    c, o = check_forecasts(confidences, outcomes)
    n_groups = check_positive_int(n_groups, "n_groups", minimum=3)
    return _hosmer_lemeshow_compute(c, o, n_groups, fitted=bool(fitted))


def _hosmer_lemeshow_compute(
    c: np.ndarray, o: np.ndarray, n_groups: int = DEFAULT_HL_GROUPS, *, fitted: bool = False
) -> tuple[float, float]:
    n = c.shape[0]
    if n < n_groups:
        return math.nan, math.nan
    order = np.argsort(c, kind="stable")
    starts = np.array([part[0] for part in np.array_split(np.arange(n), n_groups)])
    counts = np.diff(np.append(starts, n)).astype(np.float64)
    expected = np.add.reduceat(c[order], starts)
    observed = np.add.reduceat(o[order], starts)
    variance = expected * (1.0 - expected / counts)
    difference = observed - expected
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(
            variance > 0.0,
            difference**2 / np.where(variance > 0.0, variance, 1.0),
            np.where(np.abs(difference) <= 1e-9 * counts, 0.0, np.inf),
        )
    statistic = float(np.sum(terms))
    return statistic, float(chdtrc(n_groups - 2 if fitted else n_groups, statistic))


# ------------------------------------------------------------------------------------------- lowess, ICI


def lowess(x: Any, y: Any, *, fraction: float = LOWESS_FRACTION, weights: Any = None) -> np.ndarray:
    """Local linear lowess of ``y`` on ``x``, evaluated at every ``x``: one pass, no robustness iterations.

    For each point ``x_i``, ``h_i`` is the distance to its ``r``-th nearest neighbour (itself included),
    ``r = max(2, floor(fraction * N))`` as R's ``lowess``; the neighbours get tricube weights
    ``(1 - (|x_j - x_i| / h_i)^3)^3`` for ``|x_j - x_i| < h_i`` (0 beyond; if ``h_i = 0``, the points equal
    to ``x_i`` get weight 1), times ``weights`` if given, and the fitted value is the intercept at ``x_i`` of
    the weighted least-squares line (the weighted mean where the line is not determined). Cost
    ``O(N r)``: the ``r`` nearest neighbours of a point are a window of the sorted ``x``, found by a
    vectorised binary search; the weights and sums are computed in blocks of rows.

    This is Cleveland's (1979) lowess with ``iter=0``, hand-written because statsmodels is no dependency.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ws = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)[order]
    fitted_sorted = _lowess_sorted(xs, ys, ws, fraction)
    fitted = np.empty(n)
    fitted[order] = fitted_sorted
    return fitted


def _nearest_windows(xs: np.ndarray, r: int) -> np.ndarray:
    """For sorted ``xs``, the start ``lo_i`` of the window ``[lo_i, lo_i + r)`` of the ``r`` nearest to ``xs[i]``."""
    n = xs.shape[0]
    i = np.arange(n)
    low = np.maximum(0, i - r + 1)
    high = np.minimum(i, n - r)
    # smallest lo in [low, high] with xs[lo + r] - xs[i] >= xs[i] - xs[lo] (moving right does not help);
    # the predicate goes from false to true as lo grows
    while np.any(low < high):
        mid = (low + high) // 2
        right = np.where(mid + r < n, xs[np.minimum(mid + r, n - 1)], np.inf)
        holds = right - xs >= xs - xs[mid]
        high = np.where(holds, mid, high)
        low = np.where(holds, low, mid + 1)
        low = np.minimum(low, high)
    return low


def _lowess_sorted(
    xs: np.ndarray, ys: np.ndarray, ws: np.ndarray, fraction: float, n_anchors: int | None = None
) -> np.ndarray:
    """Lowess of sorted ``xs``, fitted exactly at ``n_anchors`` points evenly spread in rank (all points if
    ``None`` or ``N <= n_anchors``) and linearly interpolated between them."""
    n = xs.shape[0]
    if n == 1:
        return ys.copy()
    r = min(n, max(2, math.floor(fraction * n + 1e-7)))
    lo = _nearest_windows(xs, r)
    h = np.maximum(xs - xs[lo], xs[lo + r - 1] - xs)
    if n_anchors is None or n <= n_anchors:
        anchors = np.arange(n)
    else:
        anchors = np.unique(np.rint(np.linspace(0, n - 1, n_anchors)).astype(np.intp))
    uniform = bool(np.all(ws == ws[0]))
    fitted = np.empty(anchors.shape[0])
    rows_per_block = max(1, _LOWESS_CHUNK_ELEMENTS // n)
    for start in range(0, anchors.shape[0], rows_per_block):
        rows = anchors[start : start + rows_per_block]
        first, last = int(lo[rows[0]]), int(lo[rows[-1]]) + r  # the block's windows lie in [first, last)
        centre = xs[rows, None]
        bandwidth = h[rows, None]
        distance = xs[None, first:last] - centre
        u = np.abs(distance)
        with np.errstate(divide="ignore", invalid="ignore"):
            u /= bandwidth
        np.minimum(u, 1.0, out=u)
        kernel = u * u
        kernel *= u
        np.subtract(1.0, kernel, out=kernel)
        cube = kernel * kernel
        cube *= kernel
        kernel = cube
        if np.any(bandwidth == 0.0):
            kernel = np.where(bandwidth > 0.0, kernel, (distance == 0.0).astype(np.float64))
        if not uniform:
            kernel *= ws[None, first:last]
        kd = kernel * distance
        s0 = kernel.sum(axis=1)
        s1 = kd.sum(axis=1)
        s2 = np.einsum("ij,ij->i", kd, distance)
        t0 = kernel @ ys[first:last]
        t1 = kd @ ys[first:last]
        determinant = s0 * s2 - s1 * s1
        with np.errstate(divide="ignore", invalid="ignore"):
            line = (s2 * t0 - s1 * t1) / determinant
        fitted[start : start + rows.shape[0]] = np.where(determinant > 1e-12 * s0 * s2, line, t0 / s0)
    if anchors.shape[0] == n:
        return fitted
    return np.interp(xs, xs[anchors], fitted)


def integrated_calibration_index(
    confidences: Any, outcomes: Any, *, fraction: float = LOWESS_FRACTION
) -> tuple[float, float, float]:
    """Integrated calibration index with E50 and E90: ``(ici, e50, e90)``.

    With ``f`` the smoothed calibration curve, a :func:`lowess` of ``o`` on ``c`` (tricube kernel, span
    ``fraction = 2/3``, local linear, no robustness iterations), evaluated at every ``c_i``:

    .. math::

        ICI = \\frac{1}{N} \\sum_i |f(c_i) - c_i|, \\quad E50 = \\mathrm{median}_i |f(c_i) - c_i|, \\quad
        E90 = \\mathrm{quantile}_{0.9} |f(c_i) - c_i|

    (quantiles by linear interpolation, numpy's default). Austin and Steyerberg use R's ``loess``; the
    figure depends somewhat on the smoother, so this one states its own.

    Cost, and how close to the exact lowess: the local fit is computed exactly (all samples, their own
    bandwidths) at 2,000 anchors evenly spread in rank (:data:`LOWESS_ANCHORS`; at every sample when
    ``N <= 2,000``) and interpolated linearly between them, as R's ``lowess`` does with its ``delta``
    (which by default fits at points 1 % of the range apart). With a span of 2/3 the curve is very smooth:
    on 10,000 samples the ICI so computed differs from the one fitted at every sample by about 1e-6
    relative (tested), and costs 2,000 x 6,667 kernel evaluations instead of 10,000 x 6,667 (0.13 s
    instead of 1.6 s here). Above ``N = 10,000`` (:data:`LOWESS_EXACT_MAX`) the samples sorted by ``c`` are
    first pooled into 10,000 consecutive groups of (nearly) equal count; the lowess runs on the groups'
    mean ``c`` and mean ``o`` with the group sizes as weights (span 2/3 of the groups, i.e. of the
    samples). A group spans at most 1/10,000 of the samples against a span of 2/3, so the pooled curve
    differs from the exact one by a small fraction of its own sampling noise, at a fixed cost whatever
    ``N``; every sample still enters the ICI through its own ``c_i``.

    References: Austin and Steyerberg (2019); Cleveland (1979).
    """
    c, o = check_forecasts(confidences, outcomes)
    return _ici_compute(c, o, fraction)


def _ici_compute(
    c: np.ndarray, o: np.ndarray, fraction: float = LOWESS_FRACTION
) -> tuple[float, float, float]:
    n = c.shape[0]
    order = np.argsort(c, kind="stable")
    cs, os_ = c[order], o[order]
    if n <= LOWESS_EXACT_MAX:
        curve = _lowess_sorted(cs, os_, np.ones(n), fraction, LOWESS_ANCHORS)
    else:
        starts = np.array([part[0] for part in np.array_split(np.arange(n), LOWESS_EXACT_MAX)])
        counts = np.diff(np.append(starts, n)).astype(np.float64)
        group_c = np.add.reduceat(cs, starts) / counts
        group_o = np.add.reduceat(os_, starts) / counts
        group_curve = _lowess_sorted(group_c, group_o, counts, fraction, LOWESS_ANCHORS)
        curve = np.interp(cs, group_c, group_curve)
    gap = np.abs(curve - cs)
    return float(np.mean(gap)), float(np.median(gap)), float(np.quantile(gap, 0.9))


# ------------------------------------------------------------------------------------------ all of them


def calibration_tests(
    confidences: Any, outcomes: Any, *, n_groups: int = DEFAULT_HL_GROUPS
) -> dict[str, float]:
    """Every figure of this module (:data:`CALIBRATION_TEST_FIGURES`) of one set of forecasts.

    NaN marks a figure that is undefined for these data (see each function); :data:`CONVENTIONS` states
    the conventions in the words a report carries.
    """
    c, o = check_forecasts(confidences, outcomes)
    n_groups = check_positive_int(n_groups, "n_groups", minimum=3)
    return calibration_tests_checked(c, o, n_groups=n_groups)


def calibration_tests_checked(
    c: np.ndarray, o: np.ndarray, *, n_groups: int = DEFAULT_HL_GROUPS
) -> dict[str, float]:
    """:func:`calibration_tests` of float64 arrays validated already."""
    z, p = _spiegelhalter_compute(c, o)
    figures: dict[str, float] = {"spiegelhalter_z": z, "spiegelhalter_p": p}
    figures.update(_cumulative_compute(c, o))
    cox = _cox_compute(c, o)
    figures.update(
        calibration_slope=cox.slope,
        calibration_slope_se=cox.slope_se,
        calibration_intercept=cox.intercept,
        calibration_intercept_se=cox.intercept_se,
    )
    figures["hosmer_lemeshow"], figures["hosmer_lemeshow_p"] = _hosmer_lemeshow_compute(c, o, n_groups)
    figures["ici"], figures["e50"], figures["e90"] = _ici_compute(c, o)
    return figures
