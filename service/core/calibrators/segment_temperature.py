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

It is the service's method ``segment_temperature``: the fit route, calibrate and predict take a
``segments`` list (one key per row), and answers say which rows fell back to the global temperature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.core.calibrators.base import BaseCalibrator, _check_real
from service.core.calibrators.temperature import TemperatureScaling
from service.core.probability import log_softmax, softmax, two_column_logits
from service.core.segments import MAX_SEGMENTS, check_segments
from service.errors import InvalidInput

__all__ = ["DEFAULT_PRIOR_STRENGTH", "SegmentTemperatureScaling"]

DEFAULT_PRIOR_STRENGTH = 100.0
"""Rows the prior on each segment's log-temperature is worth (see the module docstring for why 100)."""
_BOUNDS = (0.05, 100.0)


def _mean_nll(
    logits: np.ndarray, labels: np.ndarray, temperature: float, weights: np.ndarray | None = None
) -> float:
    scaled = log_softmax(logits, temperature)
    return float(-np.average(scaled[np.arange(labels.size), labels], weights=weights))


def _curvature_per_row(logits: np.ndarray, temperature: float) -> float:
    """``d^2/du^2`` of the mean NLL at ``u = log T`` where its first derivative vanishes:
    ``beta^2 mean_i Var_p_i[z_i]`` (``beta = 1/T``)."""
    z = two_column_logits(np.asarray(logits, dtype=np.float64))
    p = np.exp(log_softmax(z, temperature))
    mean = np.einsum("ij,ij->i", p, z)
    variance = np.einsum("ij,ij->i", p, z * z) - mean**2
    return float(np.mean(np.maximum(variance, 0.0))) / temperature**2


class SegmentTemperatureScaling(BaseCalibrator):
    """Temperature scaling per segment, shrunk towards the global temperature (module docstring).

    Fitted with a segment per row (``fit(logits, labels, segments)``; without segments only the global
    temperature is fitted), applied with one (:meth:`transform_segments`); :meth:`transform` without segments
    uses the global temperature for every row. It has no TorchScript export: a row's temperature depends on
    a key that is not in the logits.

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
    num_classes_ : int
    convergence_ : dict
        The global temperature fit's record, and ``segments`` (how many).
    """

    method = "segment_temperature"
    _option_names = ("prior_strength", "bounds")
    _fitted_names = ("temperature", "segment_temperatures", "segment_counts")
    _needs_two_classes = False

    temperature_: float
    segment_temperatures_: dict[str, float]
    segment_counts_: dict[str, int]

    def __init__(self, *, prior_strength: float = DEFAULT_PRIOR_STRENGTH, bounds: Sequence[float] = _BOUNDS):
        self.prior_strength = _check_real(prior_strength, "prior_strength", minimum=0.0)
        if isinstance(bounds, str) or not isinstance(bounds, Sequence) or len(bounds) != 2:
            raise InvalidInput(f"bounds must be two numbers 0 < low < high, got {bounds!r}", field="bounds")
        low, high = (_check_real(value, "bounds") for value in bounds)
        if not 0 < low < high < math.inf:
            raise InvalidInput(f"bounds must be 0 < low < high, got {bounds!r}", field="bounds")
        self.bounds = (low, high)
        self._segments: Any = None

    def fit(
        self,
        logits: Any,
        labels: Any,
        segments: Any = None,
        *,
        sample_weight: Any = None,
        validate: bool = True,
    ) -> SegmentTemperatureScaling:
        """Fit the global temperature on every row, then each segment's, shrunk towards it."""
        self._segments = segments
        try:
            return super().fit(logits, labels, sample_weight=sample_weight, validate=validate)
        finally:
            self._segments = None

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        from scipy.optimize import minimize_scalar  # scipy.optimize only where a fit runs

        glob = TemperatureScaling(bounds=list(self.bounds)).fit(z, y, sample_weight=w, validate=False)
        temperature = float(glob.temperature_)
        temperatures: dict[str, float] = {}
        counts: dict[str, int] = {}
        if self._segments is not None:
            codes, names = check_segments(self._segments, z.shape[0])
            u_global = math.log(temperature)
            strength = self.prior_strength * _curvature_per_row(z, temperature)
            log_low, log_high = math.log(self.bounds[0]), math.log(self.bounds[1])
            for code, name in enumerate(names):
                rows = np.flatnonzero(codes == code)
                z_s, y_s = z[rows], y[rows]
                w_s = None if w is None else w[rows]
                n_s = float(rows.size)  # rows; sample weights weigh rows within the segment's mean

                def objective(
                    u: float, z_s: np.ndarray = z_s, y_s: np.ndarray = y_s, w_s: Any = w_s, n_s: float = n_s
                ) -> float:
                    return n_s * _mean_nll(z_s, y_s, math.exp(u), w_s) + 0.5 * strength * (u - u_global) ** 2

                result = minimize_scalar(
                    objective, bounds=(log_low, log_high), method="bounded", options={"xatol": 1e-10}
                )
                temperatures[name] = float(math.exp(result.x))
                counts[name] = int(rows.size)
        self.temperature_ = temperature
        self.segment_temperatures_ = temperatures
        self.segment_counts_ = counts
        self.convergence_ = {**glob.convergence_, "segments": len(temperatures)}

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return softmax(z, self.temperature_)

    def transform_segments(
        self, logits: Any, segments: Any, *, validate: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities, fallback)``: ``softmax(z / T_s)`` with each row's segment temperature, and
        which rows got the global temperature instead (a segment the fit did not see, or ``None``)."""
        self._check_fitted()
        z = self._check_transform_input(logits) if validate else logits
        z = two_column_logits(np.asarray(z, dtype=np.float64))
        keys = list(segments.tolist() if isinstance(segments, np.ndarray) else segments)
        if len(keys) != z.shape[0]:
            raise InvalidInput(
                f"segments has {len(keys)} entries for {z.shape[0]} rows: give one segment per row",
                field="segments",
            )
        temperatures = np.empty(z.shape[0])
        fallback = np.zeros(z.shape[0], dtype=bool)
        for row, key in enumerate(keys):
            if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
                raise InvalidInput(
                    f"segments[{row}] is {key!r}; a segment is a string, an integer or null", field="segments"
                )
            known = None if key is None else self.segment_temperatures_.get(str(key))
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
        """The document, with the global ``temperature`` also at top level (as temperature scaling's)."""
        document = super().to_dict()
        return {"method": self.method, "temperature": self.temperature_, **document}

    def _fitted_params(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature_,
            "segment_temperatures": dict(self.segment_temperatures_),
            "segment_counts": dict(self.segment_counts_),
        }

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        low, high = self.bounds

        def temperature_of(value: Any, where: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise InvalidInput(
                    f"calibrator document {where} must be a number within [{low:g}, {high:g}], got {value!r}",
                    field=where,
                )
            return float(value)

        self.temperature_ = temperature_of(params["temperature"], "temperature")
        segments = params["segment_temperatures"]
        counts = params["segment_counts"]
        if not isinstance(segments, Mapping) or not isinstance(counts, Mapping):
            raise InvalidInput(
                "calibrator document segment_temperatures and segment_counts must be objects",
                field="segment_temperatures",
            )
        if len(segments) > MAX_SEGMENTS:
            raise InvalidInput(
                f"calibrator document has {len(segments)} segments, above the limit of {MAX_SEGMENTS}",
                field="segment_temperatures",
            )
        self.segment_temperatures_ = {
            str(key): temperature_of(value, f"segment_temperatures[{key!r}]")
            for key, value in segments.items()
        }
        self.segment_counts_ = {}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(
                    f"calibrator document segment_counts[{key!r}] must be a count, got {value!r}",
                    field="segment_counts",
                )
            self.segment_counts_[str(key)] = value
