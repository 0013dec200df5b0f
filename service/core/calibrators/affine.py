"""Vector and matrix scaling (Guo et al. 2017; the matrix's off-diagonal penalty is Kull et al.'s ODIR)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core import cancellation
from service.core.calibrators.base import (
    BaseCalibrator,
    _binary_margin,
    _check_real,
    _doc_array,
    _doc_shape,
    _normalised_weights,
)
from service.core.validation import check_choice, check_positive_int
from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

AFFINE_MAX_ITER = 10_000
"""Most L-BFGS-B iterations of vector and matrix scaling: each evaluates the objective once or a few times
(an ``N x K x K`` product for matrix scaling); fits converge in tens to hundreds (K = 100: 127)."""
AFFINE_MAX_PARAMETER = 1e12
"""Largest magnitude of a fitted (or uploaded) scale, weight or bias. With logits of at most
``MAX_ABS_LOGIT = 1e100`` and ``K <= MATRIX_MAX_CLASSES`` the scores ``W z + b`` stay below 1e116, so the
softmax of any accepted logits is finite; fitted values are O(1) (the penalty pulls them to the identity),
and the margin up to 1e12 leaves room for unpenalised fits (``reg=0``) on separable data."""
MAX_REG = 1e6
"""Largest L2 penalty (``reg``, ``off_diagonal_reg``): beyond it the penalty pins the map to the identity
anyway, and 1e300 overflowed the objective."""
MATRIX_MAX_CLASSES = 1_000
"""Most classes of matrix scaling (``K``). It has ``K^2 + K`` parameters: one ``K x K`` float64 array is
8 MB at K = 1,000, the fit holds about 25 of them (L-BFGS-B's 10 correction pairs, gradient, curvature,
preconditioner), ~200 MB, and each iteration multiplies ``N x K`` by ``K x K``. K = 20,000 would need
3.2 GB per array."""


TEMPERATURE_START_ROWS = 100_000
"""Most rows the start's temperature is fitted on (a start needs no more; the fit itself uses every row)."""


def _temperature_start(x: np.ndarray, y: np.ndarray, coefficients: np.ndarray) -> float:
    """``beta = 1 / T`` minimising the weighted NLL of ``softmax(beta x)`` (to about 0.1 %): bounded Brent in
    ``log beta`` over 24 e-folds around the inverse of the logits' spread, so any scale is in range. The NLL is
    convex in ``beta``."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    if len(y) > TEMPERATURE_START_ROWS:  # evenly spaced rows: deterministic
        rows = np.linspace(0, len(y) - 1, TEMPERATURE_START_ROWS).astype(np.intp)
        x, y, coefficients = x[rows], y[rows], coefficients[rows] / coefficients[rows].sum()
    index = np.arange(len(y))
    spread = float(np.max(x.max(axis=1) - x.min(axis=1)))
    centre = -np.log(spread) if spread > 0 else 0.0

    def nll(log_beta: float) -> float:
        return -float(coefficients @ log_softmax(np.exp(log_beta) * x, axis=1)[index, y])

    found = minimize_scalar(
        nll, bounds=(centre - 12.0, centre + 12.0), method="bounded", options={"xatol": 1e-3}
    )
    return float(np.exp(found.x))


class _AffineScaling(BaseCalibrator):
    """``p = softmax(a(z))`` with an affine map ``a`` fitted by penalised NLL (L-BFGS-B, analytic gradient).

    The fit starts at the identity map (the uncalibrated model) or, when its objective is lower there, at the
    temperature-scaled map ``beta z`` (:func:`_temperature_start`), and L-BFGS-B only accepts descent steps,
    so the fitted penalised objective is at most the uncalibrated NLL, and the fit does not depend on the
    logits' scale. The variables are rescaled by the square
    root of the objective's Hessian diagonal at the start (Jacobi preconditioning): logits spread over tens
    of units while most classes' probabilities are near 0, so raw curvatures differ by orders of magnitude,
    and without it L-BFGS-B ran out of 1,000 iterations on 100 classes (measured: 127 iterations with it).

    Binary models are fitted on ``[0, d]`` with ``d = z1 - z0``, which makes them a regularised Platt
    scaling and lets one fitted calibrator serve one-column and two-column logits alike.
    """

    max_iter: int

    @staticmethod
    def _design(z: np.ndarray) -> np.ndarray:
        if z.shape[1] <= 2:
            margin = _binary_margin(z)
            return np.stack([np.zeros_like(margin), margin], axis=1)
        return np.asarray(z, dtype=np.float64)

    @abstractmethod
    def _initial(self, n_classes: int, beta: float = 1.0) -> np.ndarray:
        """The map ``z -> beta z`` (temperature scaling with ``T = 1 / beta``); ``beta = 1``: the identity."""

    @abstractmethod
    def _scores_and_penalty(
        self, theta: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
        """Scores ``a(x)``, the penalty, and the map from ``dLoss/dscores`` to the full gradient in theta."""

    @abstractmethod
    def _curvature(self, x: np.ndarray, weighted_variance: np.ndarray) -> np.ndarray:
        """The objective's Hessian diagonal at the identity map, given ``c_i p_ik (1 - p_ik)`` there."""

    @abstractmethod
    def _store(self, theta: np.ndarray, n_classes: int) -> None: ...

    def _prepare(self, n_classes: int) -> None:
        """Resolve options that depend on the number of classes (before the first objective evaluation)."""

    def _check_classes(self, n_classes: int) -> None:
        """InvalidInput when the method cannot be fitted or loaded for ``n_classes`` (matrix scaling's K)."""

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        from scipy.optimize import minimize
        from scipy.special import log_softmax as _log_softmax
        from threadpoolctl import threadpool_limits

        x = self._design(z)
        n_samples, n_classes = x.shape
        self._check_classes(n_classes)
        self._prepare(n_classes)
        coefficients = _normalised_weights(w, n_samples)
        rows = np.arange(n_samples)

        def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
            scores, penalty, backward = self._scores_and_penalty(theta, x)
            log_p = _log_softmax(scores, axis=1)
            nll = -float(coefficients @ log_p[rows, y])
            residual = np.exp(log_p)
            residual[rows, y] -= 1.0
            residual *= coefficients[:, None]
            return nll + penalty, backward(residual)

        # Start from the better of the identity and the temperature-scaled map: on logits of magnitude 1e4
        # the identity's softmax is one-hot, its curvature ~0 in every direction, and L-BFGS-B from there ran
        # out of iterations far from the optimum (train NLL 405.6 against 2.30 on the same logits / 1e4).
        # From beta z the fit sees the logits on their own scale, whatever it is.
        theta0 = self._initial(n_classes)
        start_value = loss_and_gradient(theta0)[0]
        tempered = self._initial(n_classes, _temperature_start(x, y, coefficients))
        tempered_value = loss_and_gradient(tempered)[0]
        if tempered_value < start_value:
            theta0, start_value = tempered, tempered_value
        p0 = np.exp(_log_softmax(self._scores_and_penalty(theta0, x)[0], axis=1))
        curvature = self._curvature(x, coefficients[:, None] * p0 * (1.0 - p0))
        # A direction without curvature has no gradient either (a column of zeros in x, reg = 0): leave it be.
        scale = np.sqrt(np.where(curvature > 0.0, curvature, 1.0))

        def preconditioned(u: np.ndarray) -> tuple[float, np.ndarray]:
            cancellation.check()
            value, gradient = loss_and_gradient(u / scale)
            return value, gradient / scale

        # One BLAS thread: the products are small (n x K x K), and two OpenBLAS threads competing with other
        # work for two cores made a K = 100 fit 12x slower (measured: 54.6 s against 4.6 s).
        with threadpool_limits(limits=1, user_api="blas"):
            found = minimize(
                preconditioned,
                theta0 * scale,
                method="L-BFGS-B",
                jac=True,
                options={"maxiter": self.max_iter, "gtol": 1e-9, "ftol": 1e-12},
            )
        improved = found.fun <= start_value
        theta = found.x / scale if improved else theta0
        if not np.isfinite(theta).all() or np.abs(theta).max() > AFFINE_MAX_PARAMETER:
            raise InvalidInput(
                f"{self._label} diverged: a fitted parameter is outside [-{AFFINE_MAX_PARAMETER:g}, "
                f"{AFFINE_MAX_PARAMETER:g}]; raise reg",
                field="options",
            )
        self._store(theta, n_classes)
        self.convergence_ = {
            "iterations": int(found.nit),
            "gradient": float(np.max(np.abs(found.jac * scale))),
            "converged": bool(found.success),
            "objective_value": float(found.fun if improved else start_value),
            "method": "L-BFGS-B",
            "message": str(found.message),
        }

    @abstractmethod
    def _scores(self, x: np.ndarray) -> np.ndarray: ...

    def _transform(self, z: np.ndarray) -> np.ndarray:
        scores = self._scores(self._design(z))
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return scores


class VectorScaling(_AffineScaling):
    r"""Vector scaling: ``p = softmax(w * z + b)``, one scale and one bias per class (Guo et al. 2017).

    Fitted by minimising

    .. math:: \mathrm{NLL}(w, b) + \mathrm{reg}\,(\lVert w - 1\rVert^2 + \lVert b\rVert^2)

    (weighted mean NLL) with L-BFGS-B from ``w = 1, b = 0`` (the uncalibrated model) or the temperature-scaled ``w = 1/T``, so the fitted
    objective never exceeds the uncalibrated NLL. Unlike temperature scaling it can change the argmax.

    Parameters
    ----------
    reg : float, default=1e-4
        L2 penalty pulling ``w`` to 1 and ``b`` to 0; at most :data:`MAX_REG`.
    max_iter : int, default=1000
        Most L-BFGS-B iterations; at most :data:`AFFINE_MAX_ITER`.

    Fitted and uploaded scales and biases lie within ``[-AFFINE_MAX_PARAMETER, AFFINE_MAX_PARAMETER]``.

    Attributes
    ----------
    scale_ : ndarray of shape (num_classes,)
    bias_ : ndarray of shape (num_classes,)
    num_classes_ : int
    convergence_ : dict
        ``iterations``, ``gradient`` (max abs component), ``converged``, ``objective_value`` (penalised),
        ``method`` (``"L-BFGS-B"``), ``message``.
    """

    method = "vector"
    _option_names = ("reg", "max_iter")
    _fitted_names = ("scale", "bias")

    scale_: np.ndarray
    bias_: np.ndarray

    def __init__(self, *, reg: float = 1e-4, max_iter: int = 1000) -> None:
        self.reg = _check_real(reg, "reg", minimum=0.0, maximum=MAX_REG)
        self.max_iter = check_positive_int(max_iter, "max_iter", maximum=AFFINE_MAX_ITER)

    def _initial(self, n_classes: int, beta: float = 1.0) -> np.ndarray:
        return np.concatenate([np.full(n_classes, beta), np.zeros(n_classes)])

    def _scores_and_penalty(
        self, theta: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
        n_classes = x.shape[1]
        scale, bias = theta[:n_classes], theta[n_classes:]
        scores = x * scale + bias
        penalty = self.reg * (float(np.sum((scale - 1.0) ** 2)) + float(bias @ bias))

        def backward(residual: np.ndarray) -> np.ndarray:
            grad_scale = np.einsum("ik,ik->k", residual, x) + 2.0 * self.reg * (scale - 1.0)
            grad_bias = residual.sum(axis=0) + 2.0 * self.reg * bias
            return np.concatenate([grad_scale, grad_bias])

        return scores, penalty, backward

    def _curvature(self, x: np.ndarray, weighted_variance: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.einsum("ik,ik->k", weighted_variance, x * x), weighted_variance.sum(axis=0)]
        ) + (2.0 * self.reg)

    def _store(self, theta: np.ndarray, n_classes: int) -> None:
        self.scale_, self.bias_ = theta[:n_classes].copy(), theta[n_classes:].copy()

    def _scores(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale_ + self.bias_

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import AffineModule

        return AffineModule(self.scale_, self.bias_, full=False)

    def _fitted_params(self) -> dict[str, Any]:
        return {"scale": self.scale_.tolist(), "bias": self.bias_.tolist()}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        limit = AFFINE_MAX_PARAMETER
        self.scale_ = _doc_shape(
            _doc_array(params["scale"], "scale", 1, max_abs=limit), "scale", (num_classes,)
        )
        self.bias_ = _doc_shape(_doc_array(params["bias"], "bias", 1, max_abs=limit), "bias", (num_classes,))


class MatrixScaling(_AffineScaling):
    r"""Matrix scaling: ``p = softmax(W z + b)`` with a full ``K x K`` matrix (Guo et al. 2017).

    Fitted by minimising the weighted mean NLL plus

    .. math:: \mathrm{reg}\,(\lVert W - I\rVert_F^2 + \lVert b\rVert^2)
              + \mathrm{off\_diagonal\_reg}\sum_{k \ne j} W_{kj}^2

    with L-BFGS-B from ``W = I, b = 0`` (the uncalibrated model) or ``W = I / T``. The extra off-diagonal penalty is the
    ODIR idea of Kull et al. (2019): the ``K (K - 1)`` off-diagonal entries are what overfits when ``K`` is
    large against the number of samples (K = 100 on 5,000 samples has 10,100 parameters), while the diagonal
    and the biases (vector scaling's parameters) are only lightly held.

    Parameters
    ----------
    reg : float, default=1e-3
        L2 penalty pulling ``W`` to the identity and ``b`` to 0.
    off_diagonal_reg : float or "auto", default="auto"
        Further L2 penalty on each off-diagonal entry of ``W``. ``"auto"`` is ``K / 100``: on the four
        real sets in ``tests/data`` the best test NLL came with about 0.1 for K = 10 and 1.0 for K = 100
        (K = 100 with 0.01 overfits: test NLL 1.12 against 0.84).
    max_iter : int, default=1000
        Most L-BFGS-B iterations; at most :data:`AFFINE_MAX_ITER`.

    ``K`` is at most :data:`MATRIX_MAX_CLASSES` (1,000: ~200 MB of ``K x K`` arrays during a fit), on fit
    and on upload; fitted and uploaded weights and biases lie within ``[-AFFINE_MAX_PARAMETER,
    AFFINE_MAX_PARAMETER]``.

    Attributes
    ----------
    weights_ : ndarray of shape (num_classes, num_classes)
    bias_ : ndarray of shape (num_classes,)
    off_diagonal_reg_ : float
        The off-diagonal penalty used (``"auto"`` resolved).
    num_classes_ : int
    convergence_ : dict
        As for :class:`VectorScaling`.
    """

    method = "matrix"
    _option_names = ("reg", "off_diagonal_reg", "max_iter")
    _fitted_names = ("weights", "bias")

    weights_: np.ndarray
    bias_: np.ndarray
    off_diagonal_reg_: float

    def __init__(
        self, *, reg: float = 1e-3, off_diagonal_reg: float | str = "auto", max_iter: int = 1000
    ) -> None:
        self.reg = _check_real(reg, "reg", minimum=0.0, maximum=MAX_REG)
        if isinstance(off_diagonal_reg, str):
            self.off_diagonal_reg: float | str = check_choice(off_diagonal_reg, "off_diagonal_reg", ("auto",))
        else:
            self.off_diagonal_reg = _check_real(
                off_diagonal_reg, "off_diagonal_reg", minimum=0.0, maximum=MAX_REG
            )
        self.max_iter = check_positive_int(max_iter, "max_iter", maximum=AFFINE_MAX_ITER)

    def _check_classes(self, n_classes: int) -> None:
        if n_classes > MATRIX_MAX_CLASSES:
            raise InvalidInput(
                f"matrix scaling is limited to {MATRIX_MAX_CLASSES:,} classes (its K x K matrix); got "
                f"{n_classes:,}: use vector or temperature scaling",
                field="num_classes",
            )

    def _prepare(self, n_classes: int) -> None:
        self.reg_ = float(self.reg)
        if self.off_diagonal_reg == "auto":
            self.off_diagonal_reg_ = n_classes / 100.0
        else:
            self.off_diagonal_reg_ = float(self.off_diagonal_reg)

    def _initial(self, n_classes: int, beta: float = 1.0) -> np.ndarray:
        return np.concatenate([(beta * np.eye(n_classes)).ravel(), np.zeros(n_classes)])

    def _scores_and_penalty(
        self, theta: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
        n_classes = x.shape[1]
        weights = theta[: n_classes * n_classes].reshape(n_classes, n_classes)
        bias = theta[n_classes * n_classes :]
        scores = x @ weights.T + bias
        off_diagonal = weights - np.diag(np.diag(weights))
        from_identity = weights - np.eye(n_classes)
        off_reg = self.off_diagonal_reg_
        penalty = self.reg_ * (float(np.sum(from_identity**2)) + float(bias @ bias)) + off_reg * float(
            np.sum(off_diagonal**2)
        )

        def backward(residual: np.ndarray) -> np.ndarray:
            grad_weights = residual.T @ x + 2.0 * self.reg_ * from_identity + 2.0 * off_reg * off_diagonal
            grad_bias = residual.sum(axis=0) + 2.0 * self.reg_ * bias
            return np.concatenate([grad_weights.ravel(), grad_bias])

        return scores, penalty, backward

    def _curvature(self, x: np.ndarray, weighted_variance: np.ndarray) -> np.ndarray:
        n_classes = x.shape[1]
        off_diagonal = 1.0 - np.eye(n_classes)
        weights = (
            weighted_variance.T @ (x * x) + 2.0 * self.reg_ + 2.0 * self.off_diagonal_reg_ * off_diagonal
        )
        return np.concatenate([weights.ravel(), weighted_variance.sum(axis=0) + 2.0 * self.reg_])

    def _store(self, theta: np.ndarray, n_classes: int) -> None:
        self.weights_ = theta[: n_classes * n_classes].reshape(n_classes, n_classes).copy()
        self.bias_ = theta[n_classes * n_classes :].copy()

    def _scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights_.T + self.bias_

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import AffineModule

        return AffineModule(self.weights_, self.bias_, full=True)

    def _fitted_params(self) -> dict[str, Any]:
        return {"weights": self.weights_.tolist(), "bias": self.bias_.tolist()}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        self._check_classes(num_classes)
        limit = AFFINE_MAX_PARAMETER
        self.weights_ = _doc_shape(
            _doc_array(params["weights"], "weights", 2, max_abs=limit), "weights", (num_classes, num_classes)
        )
        self.bias_ = _doc_shape(_doc_array(params["bias"], "bias", 1, max_abs=limit), "bias", (num_classes,))
        self._prepare(num_classes)


DIRICHLET_CV_GRID = tuple((reg, off) for reg in (1e-4, 1e-2) for off in (1e-3, 1e-2, 1e-1, 1.0))
"""``(reg, off_diagonal_reg)`` pairs that ``reg="cv"`` chooses from: the L2 pull of the map to the identity
(and of the biases to 0) and ODIR's off-diagonal penalty, each over the decades where the best test NLL of the
real sets in ``tests/data`` lay."""


class DirichletCalibration(MatrixScaling):
    r"""Dirichlet calibration (Kull et al. 2019): matrix scaling of the log-probabilities,

    .. math:: p = \mathrm{softmax}(W \ln q + b), \qquad q = \mathrm{softmax}(z),

    fitted as :class:`MatrixScaling` (penalised NLL, L-BFGS-B) on ``ln q`` instead of ``z``: the family of
    calibration maps of a Dirichlet model of the class-conditional probabilities. For a model that gives
    probabilities only it is the natural matrix scaling (``ln q`` is what it has); binary models get the full
    ``2 x 2`` map of ``[ln(1 - s), ln s]`` (beta calibration's family).

    Parameters
    ----------
    reg : float or "cv", default=1e-3
        As for :class:`MatrixScaling`; ``"cv"`` chooses ``reg`` and ``off_diagonal_reg`` together by
        ``folds``-fold cross-validated NLL over :data:`DIRICHLET_CV_GRID` (folds of a fixed permutation:
        repeatable), then fits on all rows.
    off_diagonal_reg : float or "auto", default="auto"
        ODIR's off-diagonal penalty, as for :class:`MatrixScaling` (ignored with ``reg="cv"``).
    max_iter : int, default=1000
    folds : int, default=3
        Folds of ``reg="cv"`` (2 to 10).

    Attributes
    ----------
    weights_, bias_ : ndarray
    reg_, off_diagonal_reg_ : float
        The penalties used (chosen by cross-validation with ``reg="cv"``).
    cv_scores_ : dict or None
        ``"reg,off_diagonal_reg"`` to mean held-out NLL, with ``reg="cv"``.

    References
    ----------
    Kull, Perello-Nieto, Kängsepp, Silva Filho, Song, Flach, "Beyond temperature scaling: Obtaining
    well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019.
    """

    method = "dirichlet"
    _option_names = ("reg", "off_diagonal_reg", "max_iter", "folds")

    def __init__(
        self,
        *,
        reg: float | str = 1e-3,
        off_diagonal_reg: float | str = "auto",
        max_iter: int = 1000,
        folds: int = 3,
    ) -> None:
        cross_validated = isinstance(reg, str)
        super().__init__(
            reg=0.0 if cross_validated else reg, off_diagonal_reg=off_diagonal_reg, max_iter=max_iter
        )
        if cross_validated:
            self.reg = check_choice(reg, "reg", ("cv",))
        self.folds = check_positive_int(folds, "folds", maximum=10)
        if self.folds < 2:
            raise InvalidInput(f"folds must be at least 2, got {folds!r}", field="folds")
        self._chosen: tuple[float, float] | None = None
        self.cv_scores_: dict[str, float] | None = None

    @property
    def _label(self) -> str:
        return "Dirichlet calibration"

    @staticmethod
    def _design(z: np.ndarray) -> np.ndarray:
        from scipy.special import log_softmax as _log_softmax

        from service.core.probability import two_column_logits

        return _log_softmax(two_column_logits(np.asarray(z, dtype=np.float64)), axis=1)

    def _prepare(self, n_classes: int) -> None:
        if self._chosen is not None:
            self.reg_, self.off_diagonal_reg_ = self._chosen
        elif self.reg == "cv":  # a loaded document: its map is fitted, its penalties are not needed
            self.reg_, self.off_diagonal_reg_ = float("nan"), float("nan")
        else:
            super()._prepare(n_classes)

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        self._chosen = None
        if self.reg == "cv":
            self._chosen = self._cross_validate(z, y, w)
        super()._fit(z, y, w)

    def _cross_validate(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
        from scipy.special import log_softmax as _log_softmax

        fold_of = np.random.default_rng(0).permutation(len(y)) % self.folds
        scores: dict[tuple[float, float], float] = {}
        for reg, off in DIRICHLET_CV_GRID:
            held_out = []
            for fold in range(self.folds):
                train, test = fold_of != fold, fold_of == fold
                if len(np.unique(y[train])) < 2:
                    continue
                model = DirichletCalibration(reg=reg, off_diagonal_reg=off, max_iter=self.max_iter)
                model._fit(z[train], y[train], None if w is None else w[train])
                scores_test = model._scores(model._design(z[test]))
                log_p = _log_softmax(scores_test, axis=1)[np.arange(int(test.sum())), y[test]]
                weights = None if w is None else w[test]
                held_out.append(-float(np.average(log_p, weights=weights)))
            scores[(reg, off)] = float(np.mean(held_out)) if held_out else float("inf")
        self.cv_scores_ = {f"{reg:g},{off:g}": value for (reg, off), value in scores.items()}
        return min(scores, key=scores.__getitem__)

    def torch_module(self) -> torch.nn.Module:
        self._check_fitted()
        from service.core.calibrators.torch_modules import AffineModule

        return AffineModule(self.weights_, self.bias_, full=True, log_probabilities=True)
