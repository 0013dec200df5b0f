"""Platt scaling for binary models (Platt 1999): a logistic regression on the margin ``z1 - z0``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit, log_expit

from service.core.calibrators.base import (
    BaseCalibrator,
    _binary_margin,
    _check_bool,
    _check_magnitude,
    _check_real,
    _normalised_weights,
)
from service.core.validation import check_positive_int
from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

PLATT_MAX_ITER = 1_000
"""Most trust-region iterations of a Platt fit (each one pass over the margins; fits take about 10)."""
PLATT_MAX_PARAMETER = 1e12
"""Largest magnitude of a fitted or uploaded slope and intercept; it keeps ``a d + b`` finite for every
accepted logit (``|d| <= 2e100``). Fits run on margins rescaled to ``|d| <= 1``, where even separable data
stops at a slope of a few tens there: in logit units about ``30 / gap`` for the smallest gap between the
classes' margins, so 1e12 is only reached by classes separated by less than 1e-10."""


@dataclass(frozen=True)
class LogisticFit:
    """Maximum-likelihood logistic regression: ``weights`` (one per feature), ``intercept`` (0 when none was
    fitted), and the ``convergence`` record of the calibrator fitted with it."""

    weights: np.ndarray
    intercept: float
    convergence: dict[str, Any]


def fit_logistic(
    features: np.ndarray,
    targets: np.ndarray,
    coefficients: np.ndarray,
    *,
    intercept: bool = True,
    max_iter: int = 100,
) -> LogisticFit:
    r"""Minimise the weighted logistic loss :math:`\sum_i c_i (\log(1 + e^{s_i}) - t_i s_i)`,
    :math:`s = X w + b`, by a trust-region Newton method with the exact gradient and Hessian of this convex
    loss (``scipy.optimize.minimize(method="trust-exact")``).

    Each feature column is divided by its largest magnitude (at least 1) during the fit, as scikit-learn's
    ``_sigmoid_calibration`` does for Platt, so features of ``1e4`` stay well conditioned; the intercept
    starts at the weighted log prior odds of the targets. ``coefficients`` sum to 1.
    """
    from scipy.optimize import minimize

    n_features = features.shape[1]
    scale = np.maximum(1.0, np.max(np.abs(features), axis=0))
    x = features / scale
    if intercept:
        x = np.hstack([x, np.ones((x.shape[0], 1))])

    def loss(theta: np.ndarray) -> float:
        s = x @ theta
        # log(1 + e^s) - t s, the logistic loss against target t, without overflow.
        return float(coefficients @ (np.logaddexp(0.0, s) - targets * s))

    def gradient(theta: np.ndarray) -> np.ndarray:
        return x.T @ (coefficients * (expit(x @ theta) - targets))

    def hessian(theta: np.ndarray) -> np.ndarray:
        s = x @ theta
        curvature = coefficients * np.exp(log_expit(s) + log_expit(-s))
        return (x * curvature[:, None]).T @ x

    theta0 = np.zeros(x.shape[1])
    if intercept:
        positive = float(coefficients @ targets)
        theta0[-1] = math.log(max(positive, 1e-300) / max(1.0 - positive, 1e-300))
    found = minimize(
        loss,
        theta0,
        jac=gradient,
        hess=hessian,
        method="trust-exact",
        options={"gtol": 1e-12, "maxiter": max_iter},
    )
    largest_gradient = float(np.max(np.abs(found.jac)))
    return LogisticFit(
        weights=found.x[:n_features] / scale,
        intercept=float(found.x[-1]) if intercept else 0.0,
        convergence={
            "iterations": int(found.nit),
            "gradient": largest_gradient,
            # trust-exact reports failure when it cannot improve on a point whose gradient is already ~0.
            "converged": bool(found.success) or largest_gradient <= 1e-8,
            "objective_value": float(found.fun),
            "method": "trust-exact",
            "message": str(found.message),
        },
    )


class PlattScaling(BaseCalibrator):
    r"""Platt scaling for binary models: ``P(y = 1) = sigmoid(a d + b)`` with ``d = z1 - z0`` (Platt 1999).

    ``d`` is the single logit column, or ``z1 - z0`` for two columns. ``a`` and ``b`` are the
    maximum-likelihood estimates by default (a logistic regression of the labels on ``d``, as
    ``LogisticRegression`` without penalty would give), found by a trust-region Newton method with the
    exact gradient and Hessian of the convex loss. ``d`` is rescaled to ``|d| <= 1`` during the fit (as
    scikit-learn's ``_sigmoid_calibration`` does) so that logits of ``1e4`` stay well conditioned.

    Parameters
    ----------
    smooth_targets : bool, default=False
        Use Platt's targets ``(n_+ + 1) / (n_+ + 2)`` and ``1 / (n_- + 2)`` instead of 1 and 0 (a prior
        that keeps ``a`` finite when the classes are separable; scikit-learn's ``method="sigmoid"`` does
        this). Perfectly separable data has no finite maximum-likelihood slope: plain MLE then stops at a
        large slope where the loss is numerically 0 (probabilities of 0 and 1).
    max_iter : int, default=100
        Most trust-region iterations; at most :data:`PLATT_MAX_ITER`.

    The fitted (or uploaded) slope and intercept lie within ``[-PLATT_MAX_PARAMETER, PLATT_MAX_PARAMETER]``.

    Attributes
    ----------
    slope_ : float
        ``a``.
    intercept_ : float
        ``b``.
    num_classes_ : int
        Always 2.
    convergence_ : dict
        ``iterations``, ``gradient`` (max abs component), ``converged``, ``objective_value`` (weighted mean
        log-loss against the targets), ``method`` (``"trust-exact"``), ``message``.
    """

    method = "platt"
    _option_names = ("smooth_targets", "max_iter")
    _fitted_names = ("slope", "intercept")
    _binary_only = True

    slope_: float
    intercept_: float

    def __init__(self, *, smooth_targets: bool = False, max_iter: int = 100) -> None:
        self.smooth_targets = _check_bool(smooth_targets, "smooth_targets")
        self.max_iter = check_positive_int(max_iter, "max_iter", maximum=PLATT_MAX_ITER)

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        margin = _binary_margin(z)
        coefficients = _normalised_weights(w, margin.shape[0])
        targets = (y == 1).astype(np.float64)
        if self.smooth_targets:
            n = margin.shape[0] if w is None else float(w.sum())
            n_positive = float(coefficients @ targets) * n
            n_negative = n - n_positive
            targets = np.where(y == 1, (n_positive + 1.0) / (n_positive + 2.0), 1.0 / (n_negative + 2.0))
        fit = fit_logistic(margin[:, None], targets, coefficients, max_iter=self.max_iter)
        slope, intercept = float(fit.weights[0]), fit.intercept
        if not (abs(slope) <= PLATT_MAX_PARAMETER and abs(intercept) <= PLATT_MAX_PARAMETER):
            raise InvalidInput(
                f"Platt scaling diverged (slope {slope:g}, intercept {intercept:g}, outside "
                f"[-{PLATT_MAX_PARAMETER:g}, {PLATT_MAX_PARAMETER:g}]); try smooth_targets=true",
                field="options",
            )
        self.slope_, self.intercept_ = slope, intercept
        self.convergence_ = fit.convergence

    def _transform(self, z: np.ndarray) -> np.ndarray:
        positive = expit(self.slope_ * _binary_margin(z) + self.intercept_)
        return np.stack([1.0 - positive, positive], axis=1)

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import PlattModule

        return PlattModule(self.slope_, self.intercept_)

    def _fitted_params(self) -> dict[str, Any]:
        return {"slope": self.slope_, "intercept": self.intercept_}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        where = "calibrator document"
        self.slope_ = _check_magnitude(
            _check_real(params["slope"], "slope", where=where), "slope", PLATT_MAX_PARAMETER
        )
        self.intercept_ = _check_magnitude(
            _check_real(params["intercept"], "intercept", where=where), "intercept", PLATT_MAX_PARAMETER
        )
