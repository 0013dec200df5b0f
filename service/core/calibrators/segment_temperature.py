r"""Temperature scaling with one temperature per segment, shrunk towards the global temperature.

A segment (a customer, a site) can be over-confident where the whole set is not; its own temperature fixes
that, but a segment of 30 rows gives a noisy one. Each segment's temperature is therefore the mode of a
posterior whose prior is centred on the global temperature: with :math:`u = \log T`,

.. math::

    \hat u_s = \arg\min_u \; n_s\,\mathrm{NLL}_s(e^u) + \frac{\lambda}{2}(u - \hat u_g)^2, \qquad
    \lambda = m \, c_g, \quad c_g = \frac{\partial^2}{\partial u^2} \mathrm{NLL}(e^u)\Big|_{\hat u_g}
    = \hat\beta_g^2 \, \frac{1}{N}\sum_i \operatorname{Var}_{p_i}[z_i]

where :math:`\mathrm{NLL}_s` is the segment's mean NLL, :math:`\hat u_g` the global optimum (over all
rows) and :math:`c_g` the global NLL's curvature per row there (:math:`\beta = 1/T`). The prior strength
``m`` (``prior_strength``) is in rows: the prior weighs as much as ``m`` rows that agree with the global
temperature, so, to second order, :math:`\hat u_s \approx (n_s c_s u_s^* + m c_g \hat u_g) / (n_s c_s + m
c_g)`: a segment of ``m`` rows (with the global curvature) lands halfway between its own optimum
:math:`u_s^*` and the global one, a segment of ``10 m`` rows 91 % of the way to its own. Why in log T:
the temperature is a scale, so a prior symmetric in ``log T`` treats halving and doubling alike. Why
``m = 100`` by default: it is the segment-size floor of the evaluation reports (below 100 rows a segment's
figures are too noisy to gate on, and its temperature too noisy to trust alone).

Each segment's objective is minimised by bounded Brent on ``u`` within ``log(bounds)``
(:func:`scipy.optimize.minimize_scalar`; the NLL is convex in :math:`\beta`, so quasi-convex in ``u``).
Rows of a segment the calibrator has not seen, or without a segment, get the global temperature, and
:meth:`SegmentTemperatureScaling.transform_segments` says which rows those were.

This is the library half of issue #15's per-segment calibrator: it is not yet one of the service's
methods (``METHODS``); serving it needs a ``segment`` per row on calibrate and predict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.core.calibrators.temperature import TemperatureScaling
from service.core.probability import log_softmax, two_column_logits
from service.core.segments import check_segments
from service.core.validation import check_labelled, check_logits
from service.errors import InvalidInput, NotFitted

__all__ = ["DEFAULT_PRIOR_STRENGTH", "SegmentTemperatureScaling"]

DEFAULT_PRIOR_STRENGTH = 100.0
"""Rows the prior on each segment's log-temperature is worth (see the module docstring for why 100)."""
_BOUNDS = (0.05, 100.0)


def _mean_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = log_softmax(logits, temperature)
    return float(-np.mean(scaled[np.arange(labels.size), labels]))


def _curvature_per_row(logits: np.ndarray, temperature: float) -> float:
    """``d^2/du^2`` of the mean NLL at ``u = log T`` where its first derivative vanishes:
    ``beta^2 mean_i Var_p_i[z_i]`` (``beta = 1/T``)."""
    z = two_column_logits(np.asarray(logits, dtype=np.float64))
    p = np.exp(log_softmax(z, temperature))
    mean = np.einsum("ij,ij->i", p, z)
    variance = np.einsum("ij,ij->i", p, z * z) - mean**2
    return float(np.mean(np.maximum(variance, 0.0))) / temperature**2


class SegmentTemperatureScaling:
    """Temperature scaling per segment, shrunk towards the global temperature (module docstring).

    Parameters
    ----------
    prior_strength : float, default=100
        Rows the prior on each segment's ``log T`` (centred on the global one) is worth; 0 fits each segment
        on its own, a very large value gives every segment the global temperature.
    bounds : (float, float), default=(0.05, 100)
        Range of every temperature.

    Attributes
    ----------
    temperature_ : float
        The global temperature (every row).
    segment_temperatures_ : dict of str to float
        Each segment's temperature (keys as strings, as :func:`service.core.segments.check_segments`).
    segment_counts_ : dict of str to int
        Rows of each segment in the fit.
    """

    method = "segment_temperature"

    def __init__(self, *, prior_strength: float = DEFAULT_PRIOR_STRENGTH, bounds: Sequence[float] = _BOUNDS):
        if isinstance(prior_strength, bool) or not isinstance(prior_strength, int | float):
            raise InvalidInput(
                f"prior_strength must be a number >= 0, got {prior_strength!r}", field="prior_strength"
            )
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise InvalidInput(
                f"prior_strength must be a number >= 0, got {prior_strength!r}", field="prior_strength"
            )
        low, high = (float(b) for b in bounds)
        if not 0 < low < high < math.inf:
            raise InvalidInput(f"bounds must be 0 < low < high, got {bounds!r}", field="bounds")
        self.prior_strength = float(prior_strength)
        self.bounds = (low, high)
        self.temperature_: float | None = None
        self.segment_temperatures_: dict[str, float] = {}
        self.segment_counts_: dict[str, int] = {}
        self.num_classes_: int | None = None

    def fit(self, logits: Any, labels: Any, segments: Any) -> SegmentTemperatureScaling:
        """Fit the global temperature on every row, then each segment's, shrunk towards it."""
        from scipy.optimize import minimize_scalar  # scipy.optimize only where a fit runs

        z, y, _ = check_labelled(logits, labels, from_logits=True)
        codes, names = check_segments(segments, z.shape[0])
        glob = TemperatureScaling(bounds=list(self.bounds)).fit(z, y)
        temperature = float(glob.temperature_)
        u_global = math.log(temperature)
        strength = self.prior_strength * _curvature_per_row(z, temperature)
        log_low, log_high = math.log(self.bounds[0]), math.log(self.bounds[1])
        temperatures, counts = {}, {}
        for code, name in enumerate(names):
            rows = np.flatnonzero(codes == code)
            z_s, y_s = z[rows], y[rows]

            def objective(
                u: float, z_s: np.ndarray = z_s, y_s: np.ndarray = y_s, n_s: int = rows.size
            ) -> float:
                return n_s * _mean_nll(z_s, y_s, math.exp(u)) + 0.5 * strength * (u - u_global) ** 2

            result = minimize_scalar(
                objective, bounds=(log_low, log_high), method="bounded", options={"xatol": 1e-10}
            )
            temperatures[name] = float(math.exp(result.x))
            counts[name] = int(rows.size)
        self.temperature_ = temperature
        self.segment_temperatures_ = temperatures
        self.segment_counts_ = counts
        self.num_classes_ = max(2, z.shape[1])
        return self

    def transform_segments(self, logits: Any, segments: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities, fallback)``: ``softmax(z / T_s)`` with each row's segment temperature, and
        which rows got the global temperature instead (a segment the fit did not see, or ``None``)."""
        if self.temperature_ is None:
            raise NotFitted("SegmentTemperatureScaling is not fitted: call fit first")
        z = two_column_logits(check_logits(logits).astype(np.float64))
        keys = list(segments.tolist() if isinstance(segments, np.ndarray) else segments)
        if len(keys) != z.shape[0]:
            raise InvalidInput(
                f"segments has {len(keys)} entries for {z.shape[0]} rows: give one segment per row",
                field="segments",
            )
        temperatures = np.empty(z.shape[0])
        fallback = np.zeros(z.shape[0], dtype=bool)
        for row, key in enumerate(keys):
            known = None if key is None or isinstance(key, bool) else self.segment_temperatures_.get(str(key))
            if known is None:
                temperatures[row], fallback[row] = self.temperature_, True
            else:
                temperatures[row] = known
        scaled = z / temperatures[:, None]
        scaled -= scaled.max(axis=1, keepdims=True)
        probabilities = np.exp(scaled)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities, fallback

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the global ``temperature`` at top level, the segments' in ``params``."""
        if self.temperature_ is None:
            raise NotFitted("SegmentTemperatureScaling is not fitted: call fit first")
        return {
            "method": self.method,
            "temperature": self.temperature_,
            "num_classes": self.num_classes_,
            "params": {
                "temperature": self.temperature_,
                "segment_temperatures": dict(self.segment_temperatures_),
                "segment_counts": dict(self.segment_counts_),
                "prior_strength": self.prior_strength,
                "bounds": list(self.bounds),
            },
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> SegmentTemperatureScaling:
        if document.get("method") != cls.method:
            raise InvalidInput(f"not a {cls.method} document", field="method")
        params = document.get("params") or {}
        calibrator = cls(
            prior_strength=params.get("prior_strength", DEFAULT_PRIOR_STRENGTH),
            bounds=params.get("bounds", _BOUNDS),
        )
        low, high = calibrator.bounds

        def temperature_of(value: Any, where: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise InvalidInput(
                    f"{where} must be a number within {calibrator.bounds}, got {value!r}", field=where
                )
            return float(value)

        calibrator.temperature_ = temperature_of(params.get("temperature"), "temperature")
        segments = params.get("segment_temperatures") or {}
        if not isinstance(segments, Mapping):
            raise InvalidInput("segment_temperatures must be an object", field="segment_temperatures")
        calibrator.segment_temperatures_ = {
            str(key): temperature_of(value, f"segment_temperatures[{key!r}]")
            for key, value in segments.items()
        }
        calibrator.segment_counts_ = {str(k): int(v) for k, v in (params.get("segment_counts") or {}).items()}
        calibrator.num_classes_ = int(document.get("num_classes") or 2)
        return calibrator
