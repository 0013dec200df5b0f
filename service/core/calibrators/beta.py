"""Beta calibration for binary models (Kull, Silva Filho & Flach 2017)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit, log_expit

from service.core.calibrators.base import (
    BaseCalibrator,
    _binary_margin,
    _check_magnitude,
    _check_real,
    _normalised_weights,
)
from service.core.calibrators.platt import PLATT_MAX_ITER, PLATT_MAX_PARAMETER, fit_logistic
from service.core.validation import check_choice, check_positive_int
from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

BETA_PARAMETERS = ("abm", "ab", "am")


class BetaCalibration(BaseCalibrator):
    r"""Beta calibration for binary models (Kull, Silva Filho & Flach 2017):

    .. math:: \mathrm{logit}\, P(y = 1) = a \ln s - b \ln(1 - s) + c, \qquad s = \sigma(d),

    with ``d = z1 - z0`` the model's margin (the single logit column, or ``z1 - z0``), fitted by maximum
    likelihood: a logistic regression of the labels on ``ln s`` and ``-ln(1 - s)``. Its maps include the
    identity (``a = b = 1, c = 0``) and, unlike Platt scaling, the sigmoid-shaped and inverse-sigmoid-shaped
    corrections that scores squeezed towards 0 and 1 need. ``ln s`` and ``ln(1 - s)`` are computed from
    ``d`` (``log_expit``), so no score is clipped: the ``betacal`` package clips ``s`` to ``[eps, 1 - eps]``,
    which only differs for margins beyond about 36.

    Parameters
    ----------
    parameters : {"abm", "ab", "am"}, default="abm"
        ``"abm"``: the three-parameter family, with ``a, b >= 0`` as in ``betacal``: when the unconstrained
        fit gives ``a < 0`` the fit is redone with ``a = 0`` (else, with ``b < 0``, with ``b = 0``), so the
        map stays monotone. ``"ab"``: the midpoint fixed at ``m = 1/2`` (no free intercept: ``c = (a - b)
        ln 2``). ``"am"``: ``a = b``, which is Platt scaling on ``d``.
    max_iter : int, default=100
        Most trust-region iterations of each logistic fit; at most 1,000.

    Attributes
    ----------
    a_, b_, c_ : float
        The fitted map (every variant written in the three-parameter form).
    num_classes_ : int
        Always 2.
    convergence_ : dict
        As for Platt scaling (``method`` ``"trust-exact"``), of the last logistic fit.

    References
    ----------
    Kull, Silva Filho, Flach, "Beta calibration: a well-founded and easily implemented improvement on logistic
    calibration for binary classifiers", AISTATS 2017.
    """

    method = "beta"
    _option_names = ("parameters", "max_iter")
    _fitted_names = ("a", "b", "c")
    _binary_only = True

    a_: float
    b_: float
    c_: float

    def __init__(self, *, parameters: str = "abm", max_iter: int = 100) -> None:
        self.parameters = check_choice(parameters, "parameters", BETA_PARAMETERS)
        self.max_iter = check_positive_int(max_iter, "max_iter", maximum=PLATT_MAX_ITER)

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        margin = _binary_margin(z)
        log_s, log_not_s = log_expit(margin), log_expit(-margin)
        coefficients = _normalised_weights(w, margin.shape[0])
        targets = (y == 1).astype(np.float64)

        def fit(features: np.ndarray, *, intercept: bool = True):
            return fit_logistic(features, targets, coefficients, intercept=intercept, max_iter=self.max_iter)

        if self.parameters == "am":
            found = fit(margin[:, None])
            a = b = float(found.weights[0])
            c = found.intercept
        elif self.parameters == "ab":
            found = fit(
                np.stack([log_s + math.log(2.0), -(log_not_s + math.log(2.0))], axis=1), intercept=False
            )
            a, b = (float(value) for value in found.weights)
            c = (a - b) * math.log(2.0)
        else:
            found = fit(np.stack([log_s, -log_not_s], axis=1))
            a, b = (float(value) for value in found.weights)
            if a < 0:
                found = fit(-log_not_s[:, None])
                a, b = 0.0, float(found.weights[0])
            elif b < 0:
                found = fit(log_s[:, None])
                a, b = float(found.weights[0]), 0.0
            c = found.intercept
        if not all(abs(value) <= PLATT_MAX_PARAMETER for value in (a, b, c)):
            raise InvalidInput(
                f"beta calibration diverged (a {a:g}, b {b:g}, c {c:g}, outside [-{PLATT_MAX_PARAMETER:g}, "
                f"{PLATT_MAX_PARAMETER:g}]): the classes are separable by the margin",
                field="options",
            )
        self.a_, self.b_, self.c_ = a, b, c
        self.convergence_ = found.convergence

    def _transform(self, z: np.ndarray) -> np.ndarray:
        margin = _binary_margin(z)
        positive = expit(self.a_ * log_expit(margin) - self.b_ * log_expit(-margin) + self.c_)
        return np.stack([1.0 - positive, positive], axis=1)

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import BetaModule

        return BetaModule(self.a_, self.b_, self.c_)

    def _fitted_params(self) -> dict[str, Any]:
        return {"a": self.a_, "b": self.b_, "c": self.c_}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        where = "calibrator document"
        self.a_, self.b_, self.c_ = (
            _check_magnitude(_check_real(params[name], name, where=where), name, PLATT_MAX_PARAMETER)
            for name in ("a", "b", "c")
        )
