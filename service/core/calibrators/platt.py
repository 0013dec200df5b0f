"""Platt scaling for binary models (Platt 1999): a logistic regression on the margin ``z1 - z0``."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
        from scipy.optimize import minimize

        margin = _binary_margin(z)
        scale = max(1.0, float(np.max(np.abs(margin))))
        x = margin / scale
        coefficients = _normalised_weights(w, margin.shape[0])
        positive = y == 1
        weight_positive = float(coefficients[positive].sum())
        weight_negative = 1.0 - weight_positive
        targets = positive.astype(np.float64)
        if self.smooth_targets:
            n = margin.shape[0] if w is None else float(w.sum())
            n_positive, n_negative = weight_positive * n, weight_negative * n
            targets = np.where(positive, (n_positive + 1.0) / (n_positive + 2.0), 1.0 / (n_negative + 2.0))

        def loss(theta: np.ndarray) -> float:
            s = theta[0] * x + theta[1]
            # log(1 + e^s) - t s, the logistic loss against target t, without overflow.
            return float(coefficients @ (np.logaddexp(0.0, s) - targets * s))

        def gradient(theta: np.ndarray) -> np.ndarray:
            residual = coefficients * (expit(theta[0] * x + theta[1]) - targets)
            return np.array([residual @ x, residual.sum()])

        def hessian(theta: np.ndarray) -> np.ndarray:
            s = theta[0] * x + theta[1]
            curvature = coefficients * np.exp(log_expit(s) + log_expit(-s))
            cross = float(curvature @ x)
            return np.array([[float(curvature @ (x * x)), cross], [cross, float(curvature.sum())]])

        prior = math.log(max(weight_positive, 1e-300) / max(weight_negative, 1e-300))
        found = minimize(
            loss,
            np.array([0.0, prior]),
            jac=gradient,
            hess=hessian,
            method="trust-exact",
            options={"gtol": 1e-12, "maxiter": self.max_iter},
        )
        slope, intercept = float(found.x[0] / scale), float(found.x[1])
        if not (abs(slope) <= PLATT_MAX_PARAMETER and abs(intercept) <= PLATT_MAX_PARAMETER):
            raise InvalidInput(
                f"Platt scaling diverged (slope {slope:g}, intercept {intercept:g}, outside "
                f"[-{PLATT_MAX_PARAMETER:g}, {PLATT_MAX_PARAMETER:g}]); try smooth_targets=true",
                field="options",
            )
        self.slope_, self.intercept_ = slope, intercept
        self.convergence_ = {
            "iterations": int(found.nit),
            "gradient": float(np.max(np.abs(found.jac))),
            # trust-exact reports failure when it cannot improve on a point whose gradient is already ~0.
            "converged": bool(found.success) or float(np.max(np.abs(found.jac))) <= 1e-8,
            "objective_value": float(found.fun),
            "method": "trust-exact",
            "message": str(found.message),
        }

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
