"""Temperature scaling (Guo et al. 2017): one scalar ``T``, fitted exactly by a safeguarded Newton iteration."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core.calibrators.base import BaseCalibrator, _check_real
from service.core.probability import softmax, two_column_logits
from service.core.validation import MAX_NUM_CLASSES, check_choice, check_positive_int
from service.errors import InvalidInput
from service.lazy import require_module

if TYPE_CHECKING:  # torch is imported only by a fit, a large transform or an export
    import torch

    from service.core.calibrators.temperature_objective import TemperatureObjective

logger = logging.getLogger("service.core.calibrators")

# Temperature fits on more elements than this start Newton from the optimum of a strided subsample this size.
_WARM_START_ELEMENTS = 1 << 20
# Relative step in beta below which the float32 stage of a temperature fit hands over to float64 passes.
_SINGLE_PRECISION_TOL = 1e-4


def _safeguarded_newton(
    derivatives: Callable[[float], tuple[float, float, float]],
    lower: float,
    upper: float,
    *,
    tol: float,
    max_iter: int,
    start: float = 1.0,
) -> dict[str, Any]:
    """Minimise a convex function of ``x > 0`` on ``[lower, upper]`` by Newton steps kept inside a bracket.

    ``derivatives(x)`` returns the value, first and second derivative; the search starts at ``start``.
    Each step is Newton's on ``log x`` (``log x -= f' / (x f'' + f')``, which cannot leave ``x > 0`` and
    moves at most a factor ``e`` while ``f' > 0``), or Newton's on ``x`` where that one is undefined. The sign of ``f'`` at each iterate shrinks
    a bracket around the minimiser; a step that would leave it goes to the unvisited bound instead (so a
    minimiser beyond a bound costs one evaluation), or else to the bracket's geometric midpoint. Stops when
    the next step would be below ``tol * x``, or the bracket is. ``at_bound`` names the bound the
    constrained minimiser sits on, if any; ``next`` is that last small step's target (else ``x``).
    """
    lowest, highest = lower, upper
    x = min(max(start, lower), upper)
    value, gradient, curvature = derivatives(x)
    following: float | None = None
    lower_seen = upper_seen = False
    converged = False
    at_bound: str | None = None
    iterations = 0
    while True:
        if gradient == 0.0:
            converged = True
            break
        if (x == highest and gradient < 0.0) or (x == lowest and gradient > 0.0):
            at_bound = "upper" if x == highest else "lower"
            converged = True
            break
        if gradient > 0.0:
            upper, upper_seen = x, True
        else:
            lower, lower_seen = x, True
        if lower_seen and upper_seen and upper - lower <= tol * x:
            converged = True
            break
        log_curvature = x * curvature + gradient
        if log_curvature > 0.0:
            # Capped: where f' < 0 and x f'' + f' is tiny the ratio can overflow exp; any step beyond the
            # bracket goes to a bound or the midpoint below anyway.
            candidate = x * math.exp(min(-gradient / log_curvature, 64.0))
        elif curvature > 0.0:
            candidate = x - gradient / curvature
        else:
            candidate = math.nan
        if abs(candidate - x) <= tol * x:
            following = candidate
            converged = True
            break
        if iterations >= max_iter:
            break
        if not lower <= candidate <= upper:
            if gradient < 0.0 and not upper_seen:
                candidate = upper
            elif gradient > 0.0 and not lower_seen:
                candidate = lower
            else:
                candidate = math.sqrt(lower * upper)
        x = candidate
        value, gradient, curvature = derivatives(x)
        iterations += 1
    return {
        "x": x,
        "next": x if following is None else following,
        "value": value,
        "gradient": gradient,
        "iterations": iterations,
        "converged": converged,
        "at_bound": at_bound,
    }


_TEMPERATURE_OBJECTIVES = ("nll", "weighted_nll", "focal", "brier")
TEMPERATURE_RANGE = (1e-3, 1e3)
"""Every temperature (fitted, uploaded, and both ``bounds``) lies in this range. Logits are at most
``MAX_ABS_LOGIT = 1e100`` in magnitude, so ``z / T`` stays below 1e103, far from float64's end (T = 2e-300
turned 1e99 into Inf and answered NaN). Fitted temperatures of real classifiers lie within [0.05, 20]; at
T = 1e-3 a logit gap of 0.1 is already a one-hot answer, and at T = 1e3 a gap of 100 is a near-uniform one,
so the range loses no useful calibration."""
TEMPERATURE_MAX_ITER = 1_000
"""Most Newton iterations (or Brent evaluations) of a temperature fit: one pass over the logits each (1M x
10: ~50 ms); Newton converges in under 10, so the limit only stops a runaway request (~50 s at 1M x 10)."""
MAX_GAMMA = 100.0
"""Largest focusing parameter of the focal objective (published values are 0.5 to 5; ``(1 - p)**gamma``
underflows to 0 for every row long before 100)."""


class TemperatureScaling(BaseCalibrator):
    r"""Temperature scaling: ``p = softmax(z / T)`` with one scalar ``T > 0`` (Guo et al. 2017).

    Dividing every logit by the same positive ``T`` keeps each row's argmax, so accuracy is unchanged; only
    confidence moves (``T > 1`` softens, ``T < 1`` sharpens).

    Fitting. With ``beta = 1 / T`` and ``s = beta z``, the (weighted) mean negative log-likelihood

    .. math:: \mathrm{NLL}(\beta) = \tfrac{1}{W}\sum_i w_i\,[\operatorname{logsumexp}(\beta z_i) - \beta z_{i,y_i}]

    has :math:`\mathrm{NLL}' = \tfrac{1}{W}\sum_i w_i (E_{p_i}[z_i] - z_{i,y_i})` and
    :math:`\mathrm{NLL}'' = \tfrac{1}{W}\sum_i w_i \operatorname{Var}_{p_i}[z_i] \ge 0`: it is convex in
    ``beta``, so a Newton iteration kept inside a sign bracket finds the exact minimiser in a handful of
    passes (no learning rate: the widely copied ``LBFGS(lr=0.01, max_iter=50)`` recipe stops short of it).
    Newton's first steps use float32 passes (float32 exponentials and row sums, float64 sums over rows:
    about half the time), the last ones float64 passes, so the optimum is that of the float64 NLL. Passes
    run over cache-sized blocks of the (float32 or float64) logits. Class weights (and
    ``sample_weight``) only reweight the sum, so the weighted NLL is convex too. The focal and Brier
    objectives are not convex in general: they use :func:`scipy.optimize.minimize_scalar` (bounded Brent)
    on ``log T``. ``T`` is kept within ``bounds``; ``convergence_["at_bound"]`` says which bound the optimum
    was clipped to, if any.

    Parameters
    ----------
    objective : {"nll", "weighted_nll", "focal", "brier"}, default="nll"
        What ``T`` minimises. ``"weighted_nll"`` is NLL with ``class_weight`` defaulting to ``"balanced"``.
    class_weight : None, "balanced" or sequence of float, default=None
        Per-class weights multiplying ``sample_weight`` in every objective. ``"balanced"`` is scikit-learn's
        ``compute_class_weight("balanced")``: ``n / (n_present_classes * count_k)`` (weighted counts when
        ``sample_weight`` is given). A sequence needs one non-negative entry per class.
    gamma : float, default=2.0
        Focusing parameter of the focal objective (``gamma = 0`` is NLL).
    bounds : (float, float), default=(0.05, 100.0)
        Allowed range of ``T``; both within :data:`TEMPERATURE_RANGE` ``(1e-3, 1e3)``.
    tol : float, default=1e-12
        Relative accuracy of ``beta = 1 / T``. Newton stops at a step in ``beta`` below
        ``sqrt(tol) * beta`` and takes it (its error after a step of relative size ``s`` is of order
        ``s**2``); ``convergence_["gradient"]`` is the gradient before that last step. Brent's ``xatol``
        on ``log T`` is ``max(tol, 1e-10)``.
    max_iter : int, default=100
        Most Newton iterations (Brent: most evaluations, at least 50); at most :data:`TEMPERATURE_MAX_ITER`.

    Attributes
    ----------
    temperature_ : float
    num_classes_ : int
    class_weight_ : ndarray of shape (num_classes,) or None
        The class weights used by the fit (``"balanced"`` resolved).
    convergence_ : dict
        ``iterations`` (float64 Newton steps), ``evaluations`` (passes over the full data, float32 and
        float64), ``gradient`` (``dNLL/dbeta`` at the end
        for NLL objectives; ``None`` for focal and Brier), ``converged``, ``objective_value`` (the fitted
        objective, float64), ``method`` (``"newton"`` or ``"bounded_brent"``), ``at_bound`` (``"lower"``,
        ``"upper"`` or ``None``: the bound of ``T`` the optimum was clipped to).

    Notes
    -----
    Degenerate data never gives NaN. When every row's logits are equal, the objective does not depend on
    ``T`` and the fit keeps ``T = 1`` (gradient exactly 0). Labels of one class only are accepted: ``T``
    then goes where the data pushes it, usually to a bound (reported in ``at_bound``).
    """

    method = "temperature"
    _option_names = ("objective", "class_weight", "gamma", "bounds", "tol", "max_iter")
    _fitted_names = ("temperature",)
    _needs_two_classes = False

    temperature_: float
    class_weight_: np.ndarray | None

    def __init__(
        self,
        *,
        objective: str = "nll",
        class_weight: str | Any | None = None,
        gamma: float = 2.0,
        bounds: tuple[float, float] = (0.05, 100.0),
        tol: float = 1e-12,
        max_iter: int = 100,
    ) -> None:
        self.objective = check_choice(objective, "objective", _TEMPERATURE_OBJECTIVES)
        self.class_weight = self._check_class_weight(class_weight)
        self.gamma = _check_real(gamma, "gamma", minimum=0.0, maximum=MAX_GAMMA)
        if not isinstance(bounds, list | tuple | np.ndarray) or len(bounds) != 2:
            raise InvalidInput(f"option bounds must be a pair (T_min, T_max), got {bounds!r}", field="bounds")
        low = _check_real(bounds[0], "bounds[0]", minimum=0.0, strict=True)
        high = _check_real(bounds[1], "bounds[1]", minimum=0.0, strict=True)
        t_min, t_max = TEMPERATURE_RANGE
        if not (t_min <= low <= t_max and t_min <= high <= t_max):
            raise InvalidInput(
                f"option bounds must lie within [{t_min:g}, {t_max:g}] (the range of temperatures), got "
                f"{list(bounds)!r}",
                field="bounds",
            )
        if not low < high:
            raise InvalidInput(f"option bounds must satisfy T_min < T_max, got {bounds!r}", field="bounds")
        self.bounds = (low, high)
        self.tol = _check_real(tol, "tol", minimum=0.0, strict=True, maximum=1.0)
        self.max_iter = check_positive_int(max_iter, "max_iter", maximum=TEMPERATURE_MAX_ITER)

    @staticmethod
    def _check_class_weight(class_weight: Any) -> str | tuple[float, ...] | None:
        if class_weight is None or (isinstance(class_weight, str) and class_weight == "balanced"):
            return class_weight
        if isinstance(class_weight, str | bytes | Mapping) or not hasattr(class_weight, "__len__"):
            raise InvalidInput(
                f"option class_weight must be None, 'balanced' or a list of weights, got {class_weight!r}",
                field="class_weight",
            )
        if len(class_weight) > MAX_NUM_CLASSES:
            raise InvalidInput(
                f"option class_weight has {len(class_weight):,} entries, above the limit of "
                f"{MAX_NUM_CLASSES:,} classes",
                field="class_weight",
            )
        weights = tuple(
            _check_real(v, f"class_weight[{k}]", minimum=0.0, maximum=1e100)
            for k, v in enumerate(np.asarray(class_weight))
        )
        if not weights or sum(weights) <= 0:
            raise InvalidInput("option class_weight must hold positive weights", field="class_weight")
        return weights

    def _resolve_class_weight(self, y: np.ndarray, w: np.ndarray | None, n_classes: int) -> np.ndarray | None:
        class_weight = self.class_weight
        if class_weight is None and self.objective == "weighted_nll":
            class_weight = "balanced"
        if class_weight is None:
            return None
        if class_weight == "balanced":
            present = np.unique(y if w is None else y[w > 0])
            mask = None if w is None else w > 0
            from sklearn.utils.class_weight import compute_class_weight

            balanced = compute_class_weight(
                "balanced",
                classes=present,
                y=y if mask is None else y[mask],
                sample_weight=None if w is None else w[mask],
            )
            # Classes absent from the labels never weigh a term; 1.0 keeps the vector tidy.
            resolved = np.ones(n_classes)
            resolved[present] = balanced
            return resolved
        if len(class_weight) != n_classes:
            raise InvalidInput(
                f"option class_weight has {len(class_weight)} entries but there are {n_classes} classes",
                field="class_weight",
            )
        return np.asarray(class_weight, dtype=np.float64)

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        require_module("torch", needed_for="fitting a temperature (or upload a document fitted elsewhere)")
        from service.core.calibrators.temperature_objective import TemperatureObjective

        z = two_column_logits(z)
        weights = self._fit_weights(y, w, z.shape[1])
        objective = TemperatureObjective(z, y, weights)
        if self.objective in ("nll", "weighted_nll"):
            temperature, convergence = self._fit_newton(objective, z, y, weights)
        else:
            temperature, convergence = self._fit_brent(objective)
        t_min, t_max = self.bounds
        if not math.isfinite(temperature):
            raise InvalidInput(
                f"the temperature fit did not give a finite temperature ({temperature!r}); check the logits",
                field="logits",
            )
        self.temperature_ = float(min(max(temperature, t_min), t_max))
        self.convergence_ = convergence
        if convergence["at_bound"] is not None:
            logger.info(
                "temperature fit stopped at the %s bound T=%g", convergence["at_bound"], self.temperature_
            )

    def _fit_weights(self, y: np.ndarray, w: np.ndarray | None, n_classes: int) -> np.ndarray | None:
        """Resolve ``class_weight_`` and return the per-sample weights of the objective (None: all equal)."""
        self.class_weight_ = self._resolve_class_weight(y, w, n_classes)
        if self.class_weight_ is None:
            return w
        weights = self.class_weight_[y] * (1.0 if w is None else w)
        if weights.sum() <= 0:
            raise InvalidInput(
                "class_weight gives every labelled sample weight 0: nothing to fit", field="class_weight"
            )
        return weights

    @property
    def _beta_bounds(self) -> tuple[float, float]:
        """Bounds of ``beta = 1 / T``: a bound on ``T`` is the opposite bound on ``beta``."""
        t_min, t_max = self.bounds
        return 1.0 / t_max, 1.0 / t_min

    def _fit_newton(
        self, objective: TemperatureObjective, z: np.ndarray, y: np.ndarray, weights: np.ndarray | None
    ) -> tuple[float, dict[str, Any]]:
        """NLL objectives: float32 Newton stages, then float64 Newton steps to the exact optimum."""
        start = self._single_precision_start(objective, z, y, weights)
        beta_min, beta_max = self._beta_bounds
        # Stop at a step below sqrt(tol) and take it: Newton's error after a step of relative size s
        # is of order s^2, so beta lands within ~tol of the optimum. From the float32 stage's answer
        # that is one float64 pass instead of two (the second only confirmed the first step).
        result = _safeguarded_newton(
            objective.nll,
            beta_min,
            beta_max,
            tol=math.sqrt(self.tol),
            max_iter=self.max_iter,
            start=start,
        )
        convergence = {
            "iterations": result["iterations"] + (result["next"] != result["x"]),  # the step taken last
            "evaluations": objective.evaluations,
            "gradient": result["gradient"],
            "converged": result["converged"],
            "objective_value": result["value"],
            "method": "newton",
            # A bound on beta is the opposite bound on T.
            "at_bound": {"upper": "lower", "lower": "upper", None: None}[result["at_bound"]],
        }
        return 1.0 / result["next"], convergence

    def _single_precision_start(
        self, objective: TemperatureObjective, z: np.ndarray, y: np.ndarray, weights: np.ndarray | None
    ) -> float:
        """Where the float64 Newton steps start: ``beta`` from float32 passes (1.0 if they overflow).

        Newton's first steps only need a direction and a size: float32 passes (about half the time of
        float64 ones) bring beta within ~1e-7 of the optimum; from there the float64 passes need two steps,
        the last one confirming convergence.
        """
        from service.core.calibrators.temperature_objective import SinglePrecisionOverflow

        beta_min, beta_max = self._beta_bounds
        start = 1.0
        try:
            if z.size > _WARM_START_ELEMENTS:
                start = self._subsample_start(objective, z, y, weights)
            start = _safeguarded_newton(
                objective.nll_single,
                beta_min,
                beta_max,
                tol=_SINGLE_PRECISION_TOL,
                max_iter=self.max_iter,
                start=start,
            )["next"]
        except SinglePrecisionOverflow:
            logger.debug("temperature fit: logits too spread for float32 passes; float64 only")
        return start

    def _subsample_start(
        self, objective: TemperatureObjective, z: np.ndarray, y: np.ndarray, weights: np.ndarray | None
    ) -> float:
        """Newton from T = 1 takes about 7 passes when T is ~3; started from the optimum of a strided
        subsample (a few % off, found on ~1/20 of the data) it takes about 4."""
        step = -(-z.size // _WARM_START_ELEMENTS)
        sample = type(objective)(z[::step], y[::step], None if weights is None else weights[::step])
        beta_min, beta_max = self._beta_bounds
        # tol 1e-2: the step after it lands ~1e-4 from the subsample's optimum, closer than that optimum is
        # to the full data's
        return _safeguarded_newton(sample.nll_single, beta_min, beta_max, tol=1e-2, max_iter=self.max_iter)[
            "next"
        ]

    def _fit_brent(self, objective: TemperatureObjective) -> tuple[float, dict[str, Any]]:
        """Focal and Brier objectives (not convex in general): bounded Brent on ``log T``."""
        if self.objective == "focal":

            def loss(log_t: float) -> float:
                return objective.focal(math.exp(-log_t), self.gamma)
        else:

            def loss(log_t: float) -> float:
                return objective.brier(math.exp(-log_t))

        t_min, t_max = self.bounds
        log_min, log_max = math.log(t_min), math.log(t_max)
        xatol = max(self.tol, 1e-10)
        from scipy.optimize import minimize_scalar

        found = minimize_scalar(
            loss,
            bounds=(log_min, log_max),
            method="bounded",
            options={"xatol": xatol, "maxiter": max(self.max_iter, 50)},
        )
        log_t = float(found.x)
        at_bound = None
        # Bounded Brent never evaluates the bounds themselves: snap to a bound it ends next to, if better.
        for side, edge in (("lower", log_min), ("upper", log_max)):
            if abs(log_t - edge) <= 1e3 * xatol:
                edge_value = loss(edge)
                if edge_value <= found.fun:
                    log_t, at_bound = edge, side
        convergence = {
            "iterations": int(found.nfev),
            "evaluations": objective.evaluations,
            "gradient": None,
            "converged": bool(found.success),
            "objective_value": float(loss(log_t)),
            "method": "bounded_brent",
            "at_bound": at_bound,
        }
        return math.exp(log_t), convergence

    def _transform(self, z: np.ndarray) -> np.ndarray:
        # numpy, single-threaded, at every size: with one float64 array made per call, its softmax measured as
        # fast as torch's two-thread one on a quiet machine (4096 x 1000: 17.6 ms) and many times faster on a
        # busy one, where a thread of torch's waits for a core that the server's other requests (or a Triton
        # beside it) hold (64 x 1000: 0.3 ms against 26 ms at load average 4).
        return softmax(z, self.temperature_)

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import TemperatureModule

        return TemperatureModule(self.temperature_)

    def to_dict(self) -> dict[str, Any]:
        document = super().to_dict()
        return {"method": self.method, "temperature": self.temperature_, **document}

    def _fitted_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature_}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        temperature = _check_real(
            params["temperature"], "temperature", minimum=0.0, strict=True, where="calibrator document"
        )
        if "temperature" in document:
            top = _check_real(
                document["temperature"], "temperature", minimum=0.0, strict=True, where="calibrator document"
            )
            if top != temperature:
                raise InvalidInput(
                    f"calibrator document temperature {top!r} disagrees with params.temperature {temperature!r}",
                    field="temperature",
                )
        # Its own bounds when the document states them, else the range of every temperature.
        t_min, t_max = self.bounds if "bounds" in params else TEMPERATURE_RANGE
        if not t_min <= temperature <= t_max:
            where = "its bounds params.bounds" if "bounds" in params else "the range of temperatures"
            raise InvalidInput(
                f"calibrator document temperature {temperature!r} lies outside {where} [{t_min:g}, {t_max:g}]",
                field="temperature",
            )
        self.temperature_ = temperature
        self.class_weight_ = None
