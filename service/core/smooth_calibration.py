r"""Calibration errors without bins: smooth ECE (smECE) and the KS calibration error.

``ece_smooth``: smECE (Błasiok and Nakkiran 2023), relplot's ``smECE`` with its automatic bandwidth. The
residuals ``r_i = f_i - y_i`` (``f`` the top-label confidence, ``y`` its correctness) are kernel-smoothed
over ``[0, 1]`` with a Gaussian kernel of width :math:`\sigma` reflected at 0 and 1,
:math:`\hat r_\sigma(t) = \sum_i K_\sigma(t, f_i) r_i / \sum_i K_\sigma(t, f_i)`, and

.. math::

    \mathrm{smECE}_\sigma = \frac{\sum_t |\hat r_\sigma(t)| \, \hat\delta_\sigma(t)}{\sum_t \hat\delta_\sigma(t)}

over an even mesh of ``t`` (``max(200, 10 / sigma)`` points), :math:`\hat\delta` the smoothed density. The
bandwidth is the fixed point :math:`\sigma^* = \mathrm{smECE}_{\sigma^*}`, found by bisection on ``(0, 1]``
(10 halvings). It needs no bins, is consistent, and is within constant factors of the distance to the
nearest calibrated predictor, which the binned ECE is not.

Why it is written here rather than called: relplot ships plotting code and its dependencies (matplotlib,
pandas, seaborn) that a server has no use for, and core is numpy/scipy only. The numerics are relplot's
step by step (``relplot.metrics.smECE``, ``relplot.kernels.ReflectedGaussianKernel``: the scores are first
spread linearly onto a grid of ``max(2000, 20 / sigma) // 2 + 1`` points, then convolved with the sampled
kernel); one difference: the convolution runs through ``scipy.signal.fftconvolve`` instead of
``numpy.convolve`` (O(G log G) instead of O(G^2): at sigma = 0.001, 10,001 grid points, 45 ms instead of
2 s a convolution), which changes the result by rounding only (1e-13 relative; the test against relplot on
real data asks 1e-6).

``ece_ks``: the KS calibration error of Gupta et al. (2021), :math:`\max_k |\frac{1}{N}\sum_{i \le k}
(f_i - y_i)|` with the samples sorted by confidence (a stable sort): the largest gap between the cumulative
confidence and cumulative accuracy curves. It is the statistic of the ``ks_calibration`` test *before* its
division by :math:`\sigma = \frac{1}{N}\sqrt{\sum_i f_i (1 - f_i)}`: ``ece_ks`` is a calibration error (in
units of probability, comparable across data sets), ``ks_calibration`` a test statistic (with the p-value
``ks_calibration_p``). Neither is the equal-mass ECE (``ece_mass``), which still bins.

References
----------
.. [1] Błasiok, Nakkiran (2023). "Smooth ECE: Principled reliability diagrams via kernel smoothing."
       arXiv:2309.12236 (the ``relplot`` package).
.. [2] Gupta, Rahimi, Ajanthan, Mensink, Sminchisescu, Hartley (2021). "Calibration of neural networks using
       splines." ICLR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SMOOTH_MESH_POINTS",
    "SmoothReliability",
    "ks_calibration_error",
    "smooth_ece",
    "smooth_ece_at",
    "smooth_reliability",
]

SMOOTH_MESH_POINTS = 200
"""Fewest mesh points of the smECE sum and of the smoothed reliability curve (relplot's
``config.smECE_mesh_pts``)."""
_DENSITY_EPS = 1e-4  # relplot's BaseKernelMixin.smooth: added to the density before dividing by it
_BANDWIDTH_EPS = 1e-3  # relplot's smECE(eps=0.001): a bandwidth below this is accepted as it is
_REFINE = 10  # relplot's search_param(refine=10): bisection steps


def _round_to_grid(f: np.ndarray, y: np.ndarray, points: int) -> np.ndarray:
    """Each value ``y_i`` split linearly between the two grid points around ``f_i`` (``points`` on [0, 1])."""
    bins = (f * (points - 1)).astype(int).clip(0, points - 2)
    fraction = f * (points - 1) - bins
    # bincount sums each grid point's shares in row order, as relplot's np.add.at does (10x faster)
    values = np.bincount(bins, weights=(1 - fraction) * y, minlength=points)
    values[1:] += np.bincount(bins, weights=fraction * y, minlength=points)[:-1]
    return values


def _interpolate(t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The linear interpolation of ``i / (len(y) - 1) -> y[i]`` at ``t``."""
    count = len(y)
    step = 1 / (count - 1)
    index = (t * (count - 1)).astype(int).clip(0, count - 2)
    residual = (t - index * step) / step
    return y[index] * (1 - residual) + y[index + 1] * residual


class _Grids:
    """The scores spread onto each grid size once: the grid depends on sigma only through its size
    (1,001 points for every sigma >= 0.01), so the bandwidth search passes over the N rows a few times
    instead of twice per step (1M rows: 0.9 s -> 0.1 s)."""

    def __init__(self, f: np.ndarray, y: np.ndarray):
        self.f, self.y = f, y
        self._cache: dict[tuple[int, bool], np.ndarray] = {}

    def values(self, points: int, *, ones: bool) -> np.ndarray:
        key = (points, ones)
        if key not in self._cache:
            self._cache[key] = _round_to_grid(self.f, np.ones_like(self.y) if ones else self.y, points)
        return self._cache[key]


def _apply(grids: _Grids, t: np.ndarray, sigma: float, *, ones: bool) -> np.ndarray:
    """``sum_i K_sigma(t, f_i) y_i`` (or ``sum_i K_sigma(t, f_i)``) at ``t``, the Gaussian kernel reflected
    at 0 and 1 (on a grid)."""
    points = max(2000, round(20 / sigma)) // 2 + 1
    values = grids.values(points, ones=ones)
    mesh = np.linspace(0, 1, points)
    kernel = np.exp(-(mesh - 0.5) * (mesh - 0.5) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    extended = np.concatenate([np.flip(values)[:-1], values, np.flip(values)[1:]])
    # imported here: scipy.signal costs a serving worker 0.6 s and 50 MiB at start, and only evaluations smooth
    from scipy.signal import fftconvolve

    smoothed = fftconvolve(extended, kernel, mode="valid")[points // 2 : points // 2 + points]
    return _interpolate(t, smoothed)


def _smooth(grids: _Grids, t: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel mean of the grids' y at t, kernel density at t)``."""
    density = _apply(grids, t, sigma, ones=True) + _DENSITY_EPS
    return _apply(grids, t, sigma, ones=False) / density, density


def _forecasts(confidences: np.ndarray, outcomes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(confidences, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)


def smooth_ece_at(confidences: np.ndarray, outcomes: np.ndarray, sigma: float) -> float:
    """smECE at a fixed bandwidth ``sigma`` (relplot's ``smECE_sigma``)."""
    f, y = _forecasts(confidences, outcomes)
    return _smooth_ece_at(_Grids(f, f - y), sigma)


def _smooth_ece_at(grids: _Grids, sigma: float) -> float:
    mesh = np.linspace(0, 1, max(round(10 / sigma), SMOOTH_MESH_POINTS))
    residual, density = _smooth(grids, mesh, sigma)
    return float(np.sum(np.abs(residual) * density) / np.sum(density))


def smooth_ece(confidences: np.ndarray, outcomes: np.ndarray) -> tuple[float, float]:
    """``(smECE, sigma)`` with the automatic bandwidth: relplot's ``smECE(f, y, return_width=True)``.

    ``sigma = 1`` when ``smECE_1 >= 1`` (never, for probabilities); otherwise bisection on ``(0, 1)``
    for the crossing of ``sigma`` and ``smECE_sigma`` (10 steps, keeping the upper end, as relplot's
    ``search_param``), a bandwidth under 0.001 counting as a crossing.
    """
    f, y = _forecasts(confidences, outcomes)
    return _smooth_ece(_Grids(f, f - y))


def _smooth_ece(grids: _Grids) -> tuple[float, float]:
    def crossed(sigma: float) -> bool:
        return sigma < _BANDWIDTH_EPS or sigma < _smooth_ece_at(grids, sigma)

    if crossed(1.0):
        sigma = 1.0
    else:
        sigma, low = 1.0, 0.0
        for _ in range(_REFINE):
            midpoint = (sigma + low) / 2
            if crossed(midpoint):
                low = midpoint
            else:
                sigma = midpoint
    return _smooth_ece_at(grids, sigma), sigma


@dataclass(frozen=True)
class SmoothReliability:
    """A smoothed reliability diagram: at each ``mesh`` point the kernel estimate of the accuracy given the
    confidence, and the confidences' kernel density (normalised to mean 1 over the mesh); ``sigma`` the
    bandwidth (smECE's), ``ece_smooth`` smECE."""

    mesh: np.ndarray
    accuracy: np.ndarray
    density: np.ndarray
    sigma: float
    ece_smooth: float

    def to_dict(self) -> dict:
        return {
            "mesh": self.mesh.tolist(),
            "accuracy": self.accuracy.tolist(),
            "density": self.density.tolist(),
            "sigma": self.sigma,
            "ece_smooth": self.ece_smooth,
        }


def smooth_reliability(
    confidences: np.ndarray, outcomes: np.ndarray, *, mesh_points: int = SMOOTH_MESH_POINTS
) -> SmoothReliability:
    """The smoothed reliability curve at smECE's bandwidth: ``t - r_sigma(t)`` (the confidence minus the
    smoothed residual), which is what smECE integrates, clipped to [0, 1]."""
    f, y = _forecasts(confidences, outcomes)
    grids = _Grids(f, f - y)
    value, sigma = _smooth_ece(grids)
    mesh = np.linspace(0, 1, mesh_points)
    residual, density = _smooth(grids, mesh, sigma)
    return SmoothReliability(
        mesh=mesh,
        accuracy=np.clip(mesh - residual, 0.0, 1.0),
        density=density / density.mean(),
        sigma=sigma,
        ece_smooth=value,
    )


def ks_calibration_error(confidences: np.ndarray, outcomes: np.ndarray) -> float:
    """Gupta et al.'s KS calibration error: ``max_k |(1/N) sum_{i<=k} (f_i - y_i)|``, sorted by ``f``."""
    f, y = _forecasts(confidences, outcomes)
    order = np.argsort(f, kind="stable")
    partial = np.cumsum(f[order] - y[order]) / f.shape[0]
    return float(np.max(np.abs(partial)))
