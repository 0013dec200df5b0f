"""Ensemble temperature scaling (Zhang, Kailkhura & Han 2020)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core.calibrators.base import BaseCalibrator, _check_real, _doc_array, _normalised_weights
from service.core.calibrators.temperature import TEMPERATURE_RANGE, TemperatureScaling
from service.core.probability import softmax, two_column_logits
from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

WEIGHTS_SUM_TOLERANCE = 1e-9
"""How far an uploaded document's three weights may sum from 1."""


class EnsembleTemperatureScaling(BaseCalibrator):
    r"""Ensemble temperature scaling: a convex mix of the temperature-scaled, the uncalibrated and the uniform
    prediction (Zhang, Kailkhura & Han 2020),

    .. math:: p = w_1\, \mathrm{softmax}(z / T) + w_2\, \mathrm{softmax}(z) + w_3 / K,
              \qquad w \ge 0,\ w_1 + w_2 + w_3 = 1.

    ``T`` is temperature scaling's (NLL) on the same data; the weights then minimise the (weighted) NLL,
    which only needs each row's true-class probability under the three predictions and is convex in ``w``
    (the log of a linear function), solved by SLSQP on the simplex as the authors' code does. ``w = (1, 0,
    0)`` is feasible, so the fit is never worse than temperature scaling on the fit data. The argmax is
    softmax's (the mix of two monotone maps of the same ranking and a constant). With ``w_3 > 0`` no class has
    probability 0.

    Attributes
    ----------
    temperature_ : float
    weights_ : ndarray of shape (3,)
        ``(w_1, w_2, w_3)``.
    num_classes_ : int
    convergence_ : dict
        ``iterations``, ``converged``, ``objective_value`` (weighted mean NLL), ``method`` (``"SLSQP"``),
        ``message``, and the temperature fit's record under ``temperature``.

    References
    ----------
    Zhang, Kailkhura, Han, "Mix-n-Match: Ensemble and Compositional Methods for Uncertainty Calibration in
    Deep Learning", ICML 2020.
    """

    method = "ensemble_temperature"
    _fitted_names = ("temperature", "weights")

    temperature_: float
    weights_: np.ndarray

    @property
    def _label(self) -> str:
        return "ensemble temperature scaling"

    @staticmethod
    def _components(z: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray, float]:
        columns = two_column_logits(np.asarray(z, dtype=np.float64))
        return softmax(columns, temperature), softmax(columns), 1.0 / columns.shape[1]

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        from scipy.optimize import minimize

        scaling = TemperatureScaling().fit(z, y, sample_weight=w)
        tempered, plain, uniform = self._components(z, scaling.temperature_)
        rows = np.arange(len(y))
        true_class = np.stack([tempered[rows, y], plain[rows, y], np.full(len(y), uniform)], axis=1)
        coefficients = _normalised_weights(w, len(y))

        def loss(weights: np.ndarray) -> tuple[float, np.ndarray]:
            mixed = np.maximum(true_class @ weights, 1e-300)
            return -float(coefficients @ np.log(mixed)), -(true_class.T @ (coefficients / mixed))

        found = minimize(
            loss,
            np.array([1.0, 0.0, 0.0]),
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * 3,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0, "jac": lambda v: np.ones(3)}],
            options={"ftol": 1e-12, "maxiter": 200},
        )
        weights = np.clip(found.x, 0.0, None)
        weights /= weights.sum()
        start = loss(np.array([1.0, 0.0, 0.0]))[0]
        if not loss(weights)[0] <= start:  # SLSQP may stop on a point no better than its start
            weights = np.array([1.0, 0.0, 0.0])
        self.temperature_, self.weights_ = float(scaling.temperature_), weights
        self.convergence_ = {
            "iterations": int(found.nit),
            "converged": bool(found.success),
            "objective_value": float(loss(weights)[0]),
            "method": "SLSQP",
            "message": str(found.message),
            "temperature": scaling.convergence_,
        }

    def _transform(self, z: np.ndarray) -> np.ndarray:
        tempered, plain, uniform = self._components(z, self.temperature_)
        w1, w2, w3 = self.weights_
        return w1 * tempered + w2 * plain + w3 * uniform

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import EnsembleTemperatureModule

        return EnsembleTemperatureModule(self.temperature_, self.weights_)

    def _fitted_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature_, "weights": self.weights_.tolist()}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        where = "calibrator document"
        temperature = _check_real(params["temperature"], "temperature", minimum=0.0, strict=True, where=where)
        low, high = TEMPERATURE_RANGE
        if not low <= temperature <= high:
            raise InvalidInput(
                f"{where} temperature {temperature!r} lies outside the range of temperatures [{low:g}, {high:g}]",
                field="temperature",
            )
        weights = _doc_array(params["weights"], "weights", 1)
        if weights.shape != (3,) or (weights < 0).any() or abs(weights.sum() - 1.0) > WEIGHTS_SUM_TOLERANCE:
            raise InvalidInput(
                f"{where} params.weights must be three non-negative numbers that sum to 1, got {weights.tolist()}",
                field="weights",
            )
        self.temperature_, self.weights_ = temperature, weights
