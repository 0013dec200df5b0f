"""Post-hoc calibrators: maps from a classifier's logits to calibrated probabilities.

Every calibrator follows one small protocol (:class:`Calibrator`), in scikit-learn's style: options are
keyword-only arguments of ``__init__`` (read back with :meth:`BaseCalibrator.get_params` or ``params``),
``fit(logits, labels, *, sample_weight=None)`` learns attributes whose names end in ``_``,
``transform(logits)`` returns float64 probability rows that sum to 1, and ``to_dict()`` / ``from_dict()``
round-trip through plain JSON (floats, ints, strings and lists; never pickle).

Conventions
-----------
- Logits are ``(n_samples, n_columns)``. One column is a binary model: the logit ``z`` of class 1, read as
  the two columns ``[0, z]`` (see :mod:`service.core.probability`). Transforms always return full rows, so
  a single column gives two probability columns.
- ``num_classes`` counts classes, not columns: a binary calibrator has ``num_classes == 2`` whether it was
  fitted on one column or two. Every binary calibrator here is a function of the margin ``d = z1 - z0``
  (the only thing a softmax over two columns sees), so one fitted on a single column serves two-column
  logits and the reverse.
- Fitting a method that cannot learn from one class (everything except temperature scaling) on labels that
  hold one class only raises :class:`service.errors.InvalidInput` naming the class.
- Using a calibrator before ``fit`` (or ``from_dict``) raises :class:`service.errors.NotFitted`.

Document format
---------------
``to_dict()`` returns ``{"method": ..., "params": {fitted parameters and options}, "num_classes": K,
"convergence": {...}}``; temperature scaling also puts ``"temperature": T`` at the top level. The service
wraps this document with its own keys (``format_version``, ``model``, ``version``, ...);
``from_dict`` ignores top-level keys it does not know, and rejects unknown keys inside ``params``.

References
----------
- C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
  (temperature, vector and matrix scaling, histogram binning).
- M. Kull, M. Perello-Nieto, M. Kängsepp, T. Silva Filho, H. Song, P. Flach, "Beyond temperature scaling:
  Obtaining well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019 (ODIR).
- J. Platt, "Probabilistic Outputs for Support Vector Machines and Comparisons to Regularized Likelihood
  Methods", 1999.
- B. Zadrozny, C. Elkan, "Transforming classifier scores into accurate multiclass probability estimates",
  KDD 2002 (isotonic regression, one-vs-rest); "Obtaining calibrated probability estimates from decision
  trees and naive Bayesian classifiers", ICML 2001 (histogram binning).
- T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object Detection", ICCV 2017.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit
from scipy.special import log_softmax as _log_softmax
from sklearn.isotonic import IsotonicRegression
from sklearn.utils.class_weight import compute_class_weight
from threadpoolctl import threadpool_limits

from service.core.probability import softmax, two_column_logits
from service.core.validation import (
    check_choice,
    check_labels,
    check_logits,
    check_positive_int,
    check_sample_weight,
    n_label_classes,
)
from service.errors import InvalidInput, NotFitted

__all__ = [
    "CALIBRATORS",
    "BaseCalibrator",
    "Calibrator",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "PlattScaling",
    "TemperatureScaling",
    "VectorScaling",
    "calibrator_from_dict",
    "make_calibrator",
]

logger = logging.getLogger(__name__)

# Elements (rows x columns) per block when a pass over the logits is done in float64: small enough to stay in
# cache, which made blocked float64 torch passes faster than one float32 pass over the whole array (measured:
# 1M x 10 in 42 ms, 50k x 1000 in 127 ms per evaluation of NLL and its two derivatives).
_BLOCK_ELEMENTS = 1 << 18
# From this many elements on, torch's threaded softmax beats numpy's (4096 x 1000: 18 ms vs 57 ms).
_TORCH_SOFTMAX_ELEMENTS = 1 << 15
# Temperature fits on more elements than this start Newton from the optimum of a strided subsample this size.
_WARM_START_ELEMENTS = 1 << 20
# Relative step in beta below which the float32 stage of a temperature fit hands over to float64 passes.
_SINGLE_PRECISION_TOL = 1e-4
# Rows of at most this many columns are summed by a matrix-vector product in the temperature fit's passes.
_MATVEC_SUM_COLUMNS = 32


@runtime_checkable
class Calibrator(Protocol):
    """What the service needs from a calibrator (every class in :data:`CALIBRATORS` implements it)."""

    method: ClassVar[str]

    @property
    def params(self) -> dict[str, Any]: ...

    def fit(self, logits: Any, labels: Any, *, sample_weight: Any = None) -> Self: ...

    def transform(self, logits: Any, *, validate: bool = True) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Self: ...


# --------------------------------------------------------------------------------------------------------
# Option and document checks


def _check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    where: str = "option",
) -> float:
    """A finite real number (bools refused), optionally ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidInput(f"{where} {name} must be a number, got {value!r}", field=name)
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInput(f"{where} {name} must be finite, got {value!r}", field=name)
    if minimum is not None and (number <= minimum if strict else number < minimum):
        relation = ">" if strict else ">="
        raise InvalidInput(f"{where} {name} must be {relation} {minimum:g}, got {value!r}", field=name)
    return number


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidInput(f"option {name} must be true or false, got {value!r}", field=name)
    return bool(value)


def _doc_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """A finite float64 array of ``ndim`` dimensions read from a document's ``params``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"calibrator document params.{name} must be a rectangular list of numbers", field=name
        ) from None
    if array.ndim != ndim:
        raise InvalidInput(
            f"calibrator document params.{name} must be {ndim}-D, got shape {array.shape}", field=name
        )
    if not np.isfinite(array).all():
        raise InvalidInput(f"calibrator document params.{name} holds NaN or Inf", field=name)
    return array


def _doc_shape(array: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape != shape:
        raise InvalidInput(
            f"calibrator document params.{name} must have shape {shape}, got {array.shape}", field=name
        )
    return array


def _doc_curves(params: Mapping[str, Any], x_name: str, y_name: str, n_curves: int) -> tuple[list, list]:
    """Per-class piecewise curves (knots ``x`` increasing in [0, 1], values ``y`` in [0, 1]) of a document."""
    xs, ys = params[x_name], params[y_name]
    for name, value in ((x_name, xs), (y_name, ys)):
        if not isinstance(value, list | tuple) or len(value) != n_curves:
            raise InvalidInput(
                f"calibrator document params.{name} must be a list of {n_curves} lists", field=name
            )
    x_curves, y_curves = [], []
    for k, (x_raw, y_raw) in enumerate(zip(xs, ys, strict=True)):
        x = _doc_array(x_raw, f"{x_name}[{k}]", 1)
        y = _doc_array(y_raw, f"{y_name}[{k}]", 1)
        if x.shape != y.shape or x.size == 0:
            raise InvalidInput(
                f"calibrator document params.{x_name}[{k}] and {y_name}[{k}] must be non-empty lists of "
                f"equal length, got {x.size} and {y.size}",
                field=x_name,
            )
        if (np.diff(x) < 0).any():
            raise InvalidInput(f"calibrator document params.{x_name}[{k}] must be sorted", field=x_name)
        if (y < 0).any() or (y > 1).any():
            raise InvalidInput(f"calibrator document params.{y_name}[{k}] must lie in [0, 1]", field=y_name)
        x_curves.append(x)
        y_curves.append(y)
    return x_curves, y_curves


def _json_number(value: Any) -> Any:
    """Plain Python scalars for JSON (numpy scalars converted, non-finite floats to None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --------------------------------------------------------------------------------------------------------
# Base class


class BaseCalibrator(ABC):
    """Shared plumbing: validation, the fitted check, the column check and the document format.

    Subclasses declare ``method`` (the registry name), ``_option_names`` (``__init__`` keywords, in order),
    ``_fitted_names`` (the ``params`` keys that hold fitted values), and implement ``_fit``,
    ``_transform``, ``_fitted_params`` and ``_load_fitted``.
    """

    method: ClassVar[str]
    _option_names: ClassVar[tuple[str, ...]] = ()
    _fitted_names: ClassVar[tuple[str, ...]] = ()
    # False only where the method has something to learn from labels of one class (temperature scaling).
    _needs_two_classes: ClassVar[bool] = True
    _binary_only: ClassVar[bool] = False

    num_classes_: int
    convergence_: dict[str, Any]

    # -- options ------------------------------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """Options as given to ``__init__``, JSON-safe (tuples and arrays as lists)."""
        params = {}
        for name in self._option_names:
            value = getattr(self, name)
            if isinstance(value, tuple | np.ndarray):
                value = [_json_number(v) for v in np.asarray(value).tolist()]
            params[name] = _json_number(value)
        return params

    @property
    def params(self) -> dict[str, Any]:
        """Same as :meth:`get_params`."""
        return self.get_params()

    def __repr__(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in self.get_params().items())
        return f"{type(self).__name__}({options})"

    # -- fitted state -------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "num_classes_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "num_classes_"):
            raise NotFitted(
                f"this {type(self).__name__} is not fitted yet: call fit(logits, labels) first "
                "or load a fitted one with from_dict(document)"
            )

    @property
    def _label(self) -> str:
        return self.method.replace("_", " ") + (" scaling" if self.method in _SCALING_METHODS else "")

    # -- validation ---------------------------------------------------------------------------------------

    def _check_fit_input(
        self, logits: Any, labels: Any, sample_weight: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        z = check_logits(logits)
        n_classes = n_label_classes(z.shape[1])
        if self._binary_only and n_classes != 2:
            raise InvalidInput(
                f"{self._label} is binary only; got {n_classes} classes "
                "(logits need 1 column, the logit of class 1, or 2 columns)",
                field="logits",
            )
        y = check_labels(labels, z.shape[0], z.shape[1])
        w = check_sample_weight(sample_weight, z.shape[0])
        if self._needs_two_classes:
            present = np.unique(y if w is None else y[w > 0])
            if present.size < 2:
                raise InvalidInput(
                    f"labels hold one class only (class {int(present[0])}); {self._label} cannot be fitted: "
                    "it needs samples of at least two classes",
                    field="labels",
                )
        return z, y, w

    def _check_transform_input(self, logits: Any) -> np.ndarray:
        z = check_logits(logits)
        if n_label_classes(z.shape[1]) != self.num_classes_:
            raise InvalidInput(
                f"calibrator was fitted on {self.num_classes_} classes; "
                f"logits have {_plural(z.shape[1], 'column')}",
                field="logits",
            )
        return z

    # -- protocol -----------------------------------------------------------------------------------------

    def fit(self, logits: Any, labels: Any, *, sample_weight: Any = None) -> Self:
        """Learn the calibration map from labelled logits.

        Parameters
        ----------
        logits : array-like or torch.Tensor of shape (n_samples, n_columns)
            Raw scores; one column is the logit of class 1 of a binary model.
        labels : array-like of shape (n_samples,)
            Integer classes in ``[0, num_classes)``.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights; the loss is their weighted mean.

        Returns
        -------
        self
        """
        z, y, w = self._check_fit_input(logits, labels, sample_weight)
        self._fit(z, y, w)
        self.num_classes_ = n_label_classes(z.shape[1])
        return self

    def transform(self, logits: Any, *, validate: bool = True) -> np.ndarray:
        """Calibrated probabilities, float64 of shape ``(n_samples, num_classes)``; rows sum to 1.

        ``validate=False`` skips the checks of ``logits`` (finite, 2-D, column count); pass it only with a
        2-D float numpy array that the caller has validated already (the service's hot path).
        """
        self._check_fitted()
        z = self._check_transform_input(logits) if validate else logits
        return self._transform(z)

    def fit_transform(self, logits: Any, labels: Any, *, sample_weight: Any = None) -> np.ndarray:
        """``fit`` then ``transform`` on the same logits."""
        return self.fit(logits, labels, sample_weight=sample_weight).transform(logits)

    def to_dict(self) -> dict[str, Any]:
        """The fitted calibrator as a JSON-safe document (see the module docstring)."""
        self._check_fitted()
        return {
            "method": self.method,
            "params": {**self._fitted_params(), **self.get_params()},
            "num_classes": int(self.num_classes_),
            "convergence": {key: _json_number(value) for key, value in self.convergence_.items()},
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Self:
        """Rebuild a fitted calibrator from :meth:`to_dict`'s document, validating every field.

        Raises
        ------
        InvalidInput
            Missing keys, another method, wrong shapes, non-finite numbers, invalid options.
        """
        if not isinstance(document, Mapping):
            raise InvalidInput(f"a calibrator document must be an object, got {type(document).__name__}")
        for key in ("method", "params", "num_classes"):
            if key not in document:
                raise InvalidInput(f"calibrator document lacks {key!r}", field=key)
        if document["method"] != cls.method:
            raise InvalidInput(
                f"calibrator document has method {document['method']!r}, expected {cls.method!r}",
                field="method",
            )
        num_classes = document["num_classes"]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 2:
            raise InvalidInput(
                f"calibrator document num_classes must be an integer >= 2, got {num_classes!r}",
                field="num_classes",
            )
        num_classes = int(num_classes)
        if cls._binary_only and num_classes != 2:
            raise InvalidInput(
                f"{cls.method} is binary only; the document has num_classes {num_classes}",
                field="num_classes",
            )
        params = document["params"]
        if not isinstance(params, Mapping):
            raise InvalidInput("calibrator document params must be an object", field="params")
        unknown = sorted(set(params) - set(cls._option_names) - set(cls._fitted_names))
        if unknown:
            raise InvalidInput(
                f"calibrator document params has unknown keys {', '.join(map(repr, unknown))} for method "
                f"{cls.method!r}",
                field="params",
            )
        missing = [name for name in cls._fitted_names if name not in params]
        if missing:
            raise InvalidInput(
                f"calibrator document params lacks {', '.join(map(repr, missing))}", field="params"
            )
        convergence = document.get("convergence", {})
        if convergence is None:
            convergence = {}
        if not isinstance(convergence, Mapping):
            raise InvalidInput("calibrator document convergence must be an object", field="convergence")
        calibrator = cls(**{name: params[name] for name in cls._option_names if name in params})
        calibrator._load_fitted(document, params, num_classes)
        calibrator.num_classes_ = num_classes
        calibrator.convergence_ = dict(convergence)
        return calibrator

    # -- for subclasses -----------------------------------------------------------------------------------

    @abstractmethod
    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None: ...

    @abstractmethod
    def _transform(self, z: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _fitted_params(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_fitted(
        self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int
    ) -> None: ...


_SCALING_METHODS = frozenset({"temperature", "vector", "matrix", "platt"})


def _binary_margin(z: np.ndarray) -> np.ndarray:
    """The binary logit ``d = z1 - z0`` (or the single column) in float64."""
    if z.shape[1] == 1:
        return z[:, 0].astype(np.float64)
    return z[:, 1].astype(np.float64) - z[:, 0].astype(np.float64)


def _normalised_weights(w: np.ndarray | None, n_samples: int) -> np.ndarray:
    """Per-sample weights that sum to 1 (the weighted mean's coefficients)."""
    if w is None:
        return np.full(n_samples, 1.0 / n_samples)
    return w / w.sum()


def _renormalise(probabilities: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Divide rows by their sums; rows that sum to 0 take the ``fallback`` row instead."""
    sums = probabilities.sum(axis=1, keepdims=True)
    empty = sums[:, 0] <= 0
    if empty.any():
        probabilities[empty] = fallback[empty]
        sums[empty] = probabilities[empty].sum(axis=1, keepdims=True)
    probabilities /= sums
    return probabilities


# --------------------------------------------------------------------------------------------------------
# Temperature scaling


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of ``array``, copied only when torch cannot share it (read-only, strided, byte-swapped).

    Nothing here writes into the view: every in-place operation works on a float64 copy of a block.
    """
    return torch.from_numpy(np.require(array, array.dtype.newbyteorder("="), ["C", "W"]))


def _row_blocks(n_rows: int, n_columns: int) -> Iterator[slice]:
    rows = max(1, _BLOCK_ELEMENTS // max(n_columns, 1))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


class _SinglePrecisionOverflow(ArithmeticError):
    """The float32 stage of a temperature fit met values beyond float32's range."""


class _TemperatureObjective:
    """Objectives of the inverse temperature ``beta = 1 / T`` over fixed logits, in float64.

    The logits stay as given (float32 is not copied to float64 as a whole); each pass converts one cache-sized
    block to float64, so sums and the exponentials are float64 while memory stays at the input's size.
    """

    def __init__(self, z: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        self.logits = _as_tensor(z)
        self.labels = _as_tensor(y)
        self.n_samples, self.n_columns = z.shape
        # amax, not max: no indices needed, and max(dim=1) was 2.4x slower on short rows (1M x 10: 29 ms)
        self._row_max_as_given = self.logits.amax(dim=1)
        self.row_max = self._row_max_as_given.to(torch.float64)
        # Shifted true-class logit z_y - max_k z_k (<= 0): the softmax is evaluated on z - max z.
        true_logit = self.logits.gather(1, self.labels[:, None])[:, 0].to(torch.float64)
        self.true_shifted = true_logit - self.row_max
        self.weights = None if weights is None else _as_tensor(weights)
        self.total_weight = float(self.n_samples) if weights is None else float(weights.sum())
        self.evaluations = 0
        self._workspaces: dict[
            torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}

    def _workspace(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block buffers reused by every pass: ``(shifted, exponentials, three row sums, ones)``.

        A fresh block-sized tensor per step costs page faults on every pass (1M x 10: the float64 pass took
        96 ms with them, 82 ms without).
        """
        if dtype not in self._workspaces:
            rows = min(self.n_samples, max(1, _BLOCK_ELEMENTS // max(self.n_columns, 1)))
            block = (rows, self.n_columns)
            self._workspaces[dtype] = (
                torch.empty(block, dtype=dtype),
                torch.empty(block, dtype=dtype),
                torch.empty((3, rows), dtype=dtype),
                torch.ones(self.n_columns, dtype=dtype),
            )
        return self._workspaces[dtype]

    def _row_sums(self, values: torch.Tensor, out: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        # On short rows a matrix-vector product with ones beats sum(dim=1) (1M x 10: 12 ms less per pass, in
        # float32 and float64 alike); on long rows they are even.
        if self.n_columns > _MATVEC_SUM_COLUMNS:
            return torch.sum(values, dim=1, out=out)
        return torch.mv(values, ones, out=out)

    def _derivative_sums(
        self,
        shifted: torch.Tensor,
        beta: float | torch.Tensor,
        exponentials: torch.Tensor,
        sums: torch.Tensor,
        ones: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of a block ``s = z - max z``: ``log sum_k e^{beta s_k}``, ``E_p[s]`` and ``Var_p[s]``."""
        n_rows = shifted.shape[0]
        e = torch.mul(shifted, beta, out=exponentials).exp_()
        norm = self._row_sums(e, sums[0, :n_rows], ones)
        first = self._row_sums(e.mul_(shifted), sums[1, :n_rows], ones).div_(norm)
        second = self._row_sums(e.mul_(shifted), sums[2, :n_rows], ones).div_(norm)
        second.addcmul_(first, first, value=-1.0).clamp_(min=0.0)
        return norm.log_(), first, second

    def _weighted_sum(self, values: torch.Tensor, rows: slice | None = None) -> float:
        if self.weights is None:
            return float(values.sum())
        weights = self.weights if rows is None else self.weights[rows]
        return float(torch.dot(weights, values))

    def nll(self, beta: float) -> tuple[float, float, float]:
        """Weighted mean NLL of ``softmax(beta * z)`` and its first and second derivatives in ``beta``.

        With ``s = beta * z`` and ``p = softmax(s)``: ``NLL = mean(logsumexp(s) - s_y)``,
        ``dNLL/dbeta = mean(E_p[z] - z_y)`` and ``d2NLL/dbeta2 = mean(Var_p[z]) >= 0`` (so NLL is convex
        in ``beta``). Rows are shifted by their max first, which changes none of the three.
        """
        self.evaluations += 1
        log_norm = mean_z = variance = 0.0
        shifted_buffer, exponentials, sums, ones = self._workspace(torch.float64)
        for rows in _row_blocks(self.n_samples, self.n_columns):
            shifted = shifted_buffer[: rows.stop - rows.start]
            shifted.copy_(self.logits[rows])  # float32 -> float64: z - max z below is then exact
            shifted.sub_(self.row_max[rows, None])
            logs, first, second = self._derivative_sums(
                shifted, beta, exponentials[: shifted.shape[0]], sums, ones
            )
            log_norm += self._weighted_sum(logs, rows)
            mean_z += self._weighted_sum(first, rows)
            variance += self._weighted_sum(second, rows)
        true_sum = self._weighted_sum(self.true_shifted)
        total = self.total_weight
        return (log_norm - beta * true_sum) / total, (mean_z - true_sum) / total, variance / total

    def nll_single(self, beta: float) -> tuple[float, float, float]:
        """:meth:`nll` with float32 exponentials and row sums (sums over rows in float64): a Newton stage.

        About 1e-7 relative accuracy: enough to steer Newton's first steps towards the optimum, which the
        float64 :meth:`nll` then makes exact in one or two steps. Measured per pass, same run, 1M x 10: 52 ms
        in float64, 34 ms here; 50k x 1000: 247 ms and 132 ms. Raises :class:`_SinglePrecisionOverflow` where
        the logits are too spread for float32 (squares of ``z - max z`` beyond its range).
        """
        self.evaluations += 1
        log_norm = mean_z = variance = 0.0
        beta32 = torch.tensor(beta, dtype=torch.float32)
        shifted_buffer, exponentials, sums, ones = self._workspace(torch.float32)
        for rows in _row_blocks(self.n_samples, self.n_columns):
            shifted = shifted_buffer[: rows.stop - rows.start]
            if self.logits.dtype == torch.float32:
                torch.sub(self.logits[rows], self._row_max_as_given[rows, None], out=shifted)
            else:
                shifted.copy_(self.logits[rows].sub(self._row_max_as_given[rows, None]))
            logs, first, second = self._derivative_sums(
                shifted, beta32, exponentials[: shifted.shape[0]], sums, ones
            )
            log_norm += self._weighted_sum(logs.to(torch.float64), rows)
            mean_z += self._weighted_sum(first.to(torch.float64), rows)
            variance += self._weighted_sum(second.to(torch.float64), rows)
        if not math.isfinite(log_norm + mean_z + variance):
            raise _SinglePrecisionOverflow
        true_sum = self._weighted_sum(self.true_shifted)
        total = self.total_weight
        return (log_norm - beta * true_sum) / total, (mean_z - true_sum) / total, variance / total

    def focal(self, beta: float, gamma: float) -> float:
        """Weighted mean focal loss ``-(1 - p_y)^gamma log p_y`` of ``softmax(beta * z)``."""
        self.evaluations += 1
        total = 0.0
        for rows in _row_blocks(self.n_samples, self.n_columns):
            scaled = self.logits[rows].to(torch.float64, copy=True).mul_(beta)
            log_p_true = torch.log_softmax(scaled, dim=1).gather(1, self.labels[rows, None])[:, 0]
            # 1 - p_y as -expm1(log p_y): exact when p_y is close to 1, where (1 - p_y)^gamma matters most.
            loss = torch.special.expm1(log_p_true).neg_().clamp_(min=0.0).pow_(gamma).mul_(log_p_true).neg_()
            total += self._weighted_sum(loss, rows)
        return total / self.total_weight

    def brier(self, beta: float) -> float:
        """Weighted mean multiclass Brier score ``sum_k (p_k - 1[y = k])^2`` of ``softmax(beta * z)``."""
        self.evaluations += 1
        total = 0.0
        for rows in _row_blocks(self.n_samples, self.n_columns):
            p = torch.softmax(self.logits[rows].to(torch.float64, copy=True).mul_(beta), dim=1)
            p_true = p.gather(1, self.labels[rows, None])[:, 0]
            loss = p.square().sum(dim=1).sub_(p_true.mul(2.0)).add_(1.0)
            total += self._weighted_sum(loss, rows)
        return total / self.total_weight


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
        Allowed range of ``T``.
    tol : float, default=1e-12
        Relative accuracy of ``beta = 1 / T``. Newton stops at a step in ``beta`` below
        ``sqrt(tol) * beta`` and takes it (its error after a step of relative size ``s`` is of order
        ``s**2``); ``convergence_["gradient"]`` is the gradient before that last step. Brent's ``xatol``
        on ``log T`` is ``max(tol, 1e-10)``.
    max_iter : int, default=100
        Most Newton iterations (Brent: most evaluations, at least 50).

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
        self.gamma = _check_real(gamma, "gamma", minimum=0.0)
        if not isinstance(bounds, list | tuple | np.ndarray) or len(bounds) != 2:
            raise InvalidInput(f"option bounds must be a pair (T_min, T_max), got {bounds!r}", field="bounds")
        low = _check_real(bounds[0], "bounds[0]", minimum=0.0, strict=True)
        high = _check_real(bounds[1], "bounds[1]", minimum=0.0, strict=True)
        if not low < high:
            raise InvalidInput(f"option bounds must satisfy T_min < T_max, got {bounds!r}", field="bounds")
        self.bounds = (low, high)
        self.tol = _check_real(tol, "tol", minimum=0.0, strict=True)
        self.max_iter = check_positive_int(max_iter, "max_iter")

    @staticmethod
    def _check_class_weight(class_weight: Any) -> str | tuple[float, ...] | None:
        if class_weight is None or (isinstance(class_weight, str) and class_weight == "balanced"):
            return class_weight
        if isinstance(class_weight, str | bytes | Mapping) or not hasattr(class_weight, "__len__"):
            raise InvalidInput(
                f"option class_weight must be None, 'balanced' or a list of weights, got {class_weight!r}",
                field="class_weight",
            )
        weights = tuple(
            _check_real(v, f"class_weight[{k}]", minimum=0.0) for k, v in enumerate(np.asarray(class_weight))
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
        z = two_column_logits(z)
        n_classes = z.shape[1]
        self.class_weight_ = self._resolve_class_weight(y, w, n_classes)
        weights = w
        if self.class_weight_ is not None:
            weights = self.class_weight_[y] * (1.0 if w is None else w)
            if weights.sum() <= 0:
                raise InvalidInput(
                    "class_weight gives every labelled sample weight 0: nothing to fit", field="class_weight"
                )
        objective = _TemperatureObjective(z, y, weights)
        t_min, t_max = self.bounds
        if self.objective in ("nll", "weighted_nll"):
            start = 1.0
            beta_min, beta_max = 1.0 / t_max, 1.0 / t_min
            try:
                if z.size > _WARM_START_ELEMENTS:
                    # Newton from T = 1 takes about 7 passes when T is ~3; started from the optimum of a
                    # strided subsample (a few % off, found on ~1/20 of the data) it takes about 4.
                    step = -(-z.size // _WARM_START_ELEMENTS)
                    sample = _TemperatureObjective(
                        z[::step], y[::step], None if weights is None else weights[::step]
                    )
                    # tol 1e-2: the step after it lands ~1e-4 from the subsample's optimum, closer than
                    # that optimum is to the full data's
                    start = _safeguarded_newton(
                        sample.nll_single, beta_min, beta_max, tol=1e-2, max_iter=self.max_iter
                    )["next"]
                # Newton's first steps only need a direction and a size: float32 passes (about half the
                # time of float64 ones) bring beta within ~1e-7 of the optimum; from there the float64
                # passes below need two steps, the last one confirming convergence.
                start = _safeguarded_newton(
                    objective.nll_single,
                    beta_min,
                    beta_max,
                    tol=_SINGLE_PRECISION_TOL,
                    max_iter=self.max_iter,
                    start=start,
                )["next"]
            except _SinglePrecisionOverflow:
                logger.debug("temperature fit: logits too spread for float32 passes; float64 only")
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
            temperature = 1.0 / result["next"]
            # A bound on beta is the opposite bound on T.
            at_bound = {"upper": "lower", "lower": "upper", None: None}[result["at_bound"]]
            convergence = {
                "iterations": result["iterations"] + (result["next"] != result["x"]),  # the step taken last
                "evaluations": objective.evaluations,
                "gradient": result["gradient"],
                "converged": result["converged"],
                "objective_value": result["value"],
                "method": "newton",
                "at_bound": at_bound,
            }
        else:
            if self.objective == "focal":

                def loss(log_t: float) -> float:
                    return objective.focal(math.exp(-log_t), self.gamma)
            else:

                def loss(log_t: float) -> float:
                    return objective.brier(math.exp(-log_t))

            log_min, log_max = math.log(t_min), math.log(t_max)
            xatol = max(self.tol, 1e-10)
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
            temperature = math.exp(log_t)
            convergence = {
                "iterations": int(found.nfev),
                "evaluations": objective.evaluations,
                "gradient": None,
                "converged": bool(found.success),
                "objective_value": float(loss(log_t)),
                "method": "bounded_brent",
                "at_bound": at_bound,
            }
        self.temperature_ = float(min(max(temperature, t_min), t_max))
        self.convergence_ = convergence
        if at_bound is not None:
            logger.info("temperature fit stopped at the %s bound T=%g", at_bound, self.temperature_)

    def _transform(self, z: np.ndarray) -> np.ndarray:
        if z.size >= _TORCH_SOFTMAX_ELEMENTS:
            scaled = _as_tensor(two_column_logits(np.asarray(z, dtype=np.float64)))
            return torch.softmax(scaled * (1.0 / self.temperature_), dim=1).numpy()
        return softmax(z, self.temperature_)

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
        self.temperature_ = temperature
        self.class_weight_ = None


# --------------------------------------------------------------------------------------------------------
# Vector and matrix scaling


class _AffineScaling(BaseCalibrator):
    """``p = softmax(a(z))`` with an affine map ``a`` fitted by penalised NLL (L-BFGS-B, analytic gradient).

    The fit starts at the identity map (the uncalibrated model) and L-BFGS-B only accepts descent steps, so
    the fitted penalised objective is at most the uncalibrated NLL. The variables are rescaled by the square
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
    def _initial(self, n_classes: int) -> np.ndarray: ...

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

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        x = self._design(z)
        n_samples, n_classes = x.shape
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

        theta0 = self._initial(n_classes)
        start_value = loss_and_gradient(theta0)[0]
        p0 = np.exp(_log_softmax(x, axis=1))
        curvature = self._curvature(x, coefficients[:, None] * p0 * (1.0 - p0))
        # A direction without curvature has no gradient either (a column of zeros in x, reg = 0): leave it be.
        scale = np.sqrt(np.where(curvature > 0.0, curvature, 1.0))

        def preconditioned(u: np.ndarray) -> tuple[float, np.ndarray]:
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
        self._store(found.x / scale if improved else theta0, n_classes)
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

    (weighted mean NLL) with L-BFGS-B from ``w = 1, b = 0`` (the uncalibrated model), so the fitted
    objective never exceeds the uncalibrated NLL. Unlike temperature scaling it can change the argmax.

    Parameters
    ----------
    reg : float, default=1e-4
        L2 penalty pulling ``w`` to 1 and ``b`` to 0.
    max_iter : int, default=1000
        Most L-BFGS-B iterations.

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
        self.reg = _check_real(reg, "reg", minimum=0.0)
        self.max_iter = check_positive_int(max_iter, "max_iter")

    def _initial(self, n_classes: int) -> np.ndarray:
        return np.concatenate([np.ones(n_classes), np.zeros(n_classes)])

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

    def _fitted_params(self) -> dict[str, Any]:
        return {"scale": self.scale_.tolist(), "bias": self.bias_.tolist()}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        self.scale_ = _doc_shape(_doc_array(params["scale"], "scale", 1), "scale", (num_classes,))
        self.bias_ = _doc_shape(_doc_array(params["bias"], "bias", 1), "bias", (num_classes,))


class MatrixScaling(_AffineScaling):
    r"""Matrix scaling: ``p = softmax(W z + b)`` with a full ``K x K`` matrix (Guo et al. 2017).

    Fitted by minimising the weighted mean NLL plus

    .. math:: \mathrm{reg}\,(\lVert W - I\rVert_F^2 + \lVert b\rVert^2)
              + \mathrm{off\_diagonal\_reg}\sum_{k \ne j} W_{kj}^2

    with L-BFGS-B from ``W = I, b = 0`` (the uncalibrated model). The extra off-diagonal penalty is the
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
        Most L-BFGS-B iterations.

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
        self.reg = _check_real(reg, "reg", minimum=0.0)
        if isinstance(off_diagonal_reg, str):
            self.off_diagonal_reg: float | str = check_choice(off_diagonal_reg, "off_diagonal_reg", ("auto",))
        else:
            self.off_diagonal_reg = _check_real(off_diagonal_reg, "off_diagonal_reg", minimum=0.0)
        self.max_iter = check_positive_int(max_iter, "max_iter")

    def _prepare(self, n_classes: int) -> None:
        if self.off_diagonal_reg == "auto":
            self.off_diagonal_reg_ = n_classes / 100.0
        else:
            self.off_diagonal_reg_ = float(self.off_diagonal_reg)

    def _initial(self, n_classes: int) -> np.ndarray:
        return np.concatenate([np.eye(n_classes).ravel(), np.zeros(n_classes)])

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
        penalty = self.reg * (float(np.sum(from_identity**2)) + float(bias @ bias)) + off_reg * float(
            np.sum(off_diagonal**2)
        )

        def backward(residual: np.ndarray) -> np.ndarray:
            grad_weights = residual.T @ x + 2.0 * self.reg * from_identity + 2.0 * off_reg * off_diagonal
            grad_bias = residual.sum(axis=0) + 2.0 * self.reg * bias
            return np.concatenate([grad_weights.ravel(), grad_bias])

        return scores, penalty, backward

    def _curvature(self, x: np.ndarray, weighted_variance: np.ndarray) -> np.ndarray:
        n_classes = x.shape[1]
        off_diagonal = 1.0 - np.eye(n_classes)
        weights = weighted_variance.T @ (x * x) + 2.0 * self.reg + 2.0 * self.off_diagonal_reg_ * off_diagonal
        return np.concatenate([weights.ravel(), weighted_variance.sum(axis=0) + 2.0 * self.reg])

    def _store(self, theta: np.ndarray, n_classes: int) -> None:
        self.weights_ = theta[: n_classes * n_classes].reshape(n_classes, n_classes).copy()
        self.bias_ = theta[n_classes * n_classes :].copy()

    def _scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights_.T + self.bias_

    def _fitted_params(self) -> dict[str, Any]:
        return {"weights": self.weights_.tolist(), "bias": self.bias_.tolist()}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        self.weights_ = _doc_shape(
            _doc_array(params["weights"], "weights", 2), "weights", (num_classes, num_classes)
        )
        self.bias_ = _doc_shape(_doc_array(params["bias"], "bias", 1), "bias", (num_classes,))
        self._prepare(num_classes)


# --------------------------------------------------------------------------------------------------------
# Platt scaling


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
        Most trust-region iterations.

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
        self.max_iter = check_positive_int(max_iter, "max_iter")

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
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
        self.slope_ = float(found.x[0] / scale)
        self.intercept_ = float(found.x[1])
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

    def _fitted_params(self) -> dict[str, Any]:
        return {"slope": self.slope_, "intercept": self.intercept_}

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        self.slope_ = _check_real(params["slope"], "slope", where="calibrator document")
        self.intercept_ = _check_real(params["intercept"], "intercept", where="calibrator document")


# --------------------------------------------------------------------------------------------------------
# Non-parametric: isotonic regression and histogram binning


class _OneVsRest(BaseCalibrator):
    """Shared shape of the one-vs-rest calibrators that map each class's softmax probability.

    Binary models map ``P(y = 1)`` only and return ``[1 - p, p]``. With more classes every class is mapped
    and the rows are renormalised; a row that maps to all zeros keeps its uncalibrated softmax row (the
    calibrators have no evidence there, and the model's own ranking beats a uniform guess).
    """

    @staticmethod
    def _probabilities(z: np.ndarray) -> np.ndarray:
        return softmax(z)

    @abstractmethod
    def _fit_curve(
        self, scores: np.ndarray, targets: np.ndarray, w: np.ndarray | None
    ) -> tuple[Any, Any]: ...

    @abstractmethod
    def _apply_curve(self, k: int, scores: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _set_curves(self, curves: list[tuple[Any, Any]]) -> None: ...

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        p = self._probabilities(z)
        if p.shape[1] == 2:
            curves = [self._fit_curve(p[:, 1], (y == 1).astype(np.float64), w)]
        else:
            curves = [self._fit_curve(p[:, k], (y == k).astype(np.float64), w) for k in range(p.shape[1])]
        self._set_curves(curves)
        self.convergence_ = {"converged": True, "method": self._fit_method}

    _fit_method: ClassVar[str]

    def _transform(self, z: np.ndarray) -> np.ndarray:
        p = self._probabilities(z)
        if p.shape[1] == 2:
            positive = self._apply_curve(0, p[:, 1])
            return np.stack([1.0 - positive, positive], axis=1)
        calibrated = np.empty_like(p)
        for k in range(p.shape[1]):
            calibrated[:, k] = self._apply_curve(k, p[:, k])
        return _renormalise(calibrated, p)

    @staticmethod
    def _n_curves(num_classes: int) -> int:
        return 1 if num_classes == 2 else num_classes


class IsotonicCalibration(_OneVsRest):
    """Isotonic regression of each class's softmax probability, one-vs-rest (Zadrozny & Elkan 2002).

    Each class gets scikit-learn's ``IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)`` fitted on
    ``(softmax(z)[:, k], 1[y = k])``. Only its knots (``X_thresholds_``, ``y_thresholds_``) are kept and
    ``transform`` interpolates them with :func:`numpy.interp` (linear between knots, clipped beyond, as the
    scikit-learn object predicts), so documents need no scikit-learn object. See :class:`_OneVsRest` for
    binary models and renormalisation.

    Attributes
    ----------
    x_thresholds_ : list of ndarray
        Knots per calibrated class (one entry, class 1, for binary models).
    y_thresholds_ : list of ndarray
    num_classes_ : int
    convergence_ : dict
        ``{"converged": True, "method": "isotonic_pava"}``.
    """

    method = "isotonic"
    _fitted_names = ("x_thresholds", "y_thresholds")
    _fit_method = "isotonic_pava"

    x_thresholds_: list[np.ndarray]
    y_thresholds_: list[np.ndarray]

    def __init__(self) -> None:
        pass

    def _fit_curve(
        self, scores: np.ndarray, targets: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        regression = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        regression.fit(scores, targets, sample_weight=w)
        return (
            np.asarray(regression.X_thresholds_, dtype=np.float64),
            np.asarray(regression.y_thresholds_, dtype=np.float64),
        )

    def _set_curves(self, curves: list[tuple[Any, Any]]) -> None:
        self.x_thresholds_ = [x for x, _ in curves]
        self.y_thresholds_ = [y for _, y in curves]

    def _apply_curve(self, k: int, scores: np.ndarray) -> np.ndarray:
        return np.interp(scores, self.x_thresholds_[k], self.y_thresholds_[k])

    def _fitted_params(self) -> dict[str, Any]:
        return {
            "x_thresholds": [x.tolist() for x in self.x_thresholds_],
            "y_thresholds": [y.tolist() for y in self.y_thresholds_],
        }

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        xs, ys = _doc_curves(params, "x_thresholds", "y_thresholds", self._n_curves(num_classes))
        self._set_curves(list(zip(xs, ys, strict=True)))


_BINNINGS = ("width", "mass")


class HistogramBinning(_OneVsRest):
    """Histogram binning of each class's softmax probability, one-vs-rest (Zadrozny & Elkan 2001).

    Each class's probability axis is cut into ``n_bins`` bins ``(e_i, e_{i+1}]`` (the first bin includes 0),
    and a probability is replaced by the (weighted) frequency of that class among the fit samples in its
    bin. ``binning="width"`` uses equal-width bins on [0, 1]; ``"mass"`` puts the edges at the quantiles of
    that class's fit probabilities (ties merge bins, so a class may get fewer). A bin no fit sample fell in
    maps to its own centre: without evidence the model's score is kept (roughly), not replaced by a prior.
    See :class:`_OneVsRest` for binary models and renormalisation.

    Parameters
    ----------
    n_bins : int, default=15
    binning : {"width", "mass"}, default="width"

    Attributes
    ----------
    bin_edges_ : list of ndarray
        Edges per calibrated class, from 0 to 1 (one entry, class 1, for binary models).
    bin_values_ : list of ndarray
        Calibrated probability per bin.
    num_classes_ : int
    convergence_ : dict
        ``{"converged": True, "method": "histogram"}``.
    """

    method = "histogram"
    _option_names = ("n_bins", "binning")
    _fitted_names = ("bin_edges", "bin_values")
    _fit_method = "histogram"

    bin_edges_: list[np.ndarray]
    bin_values_: list[np.ndarray]

    def __init__(self, *, n_bins: int = 15, binning: str = "width") -> None:
        self.n_bins = check_positive_int(n_bins, "n_bins")
        self.binning = check_choice(binning, "binning", _BINNINGS)

    @property
    def _label(self) -> str:
        return "histogram binning"

    @staticmethod
    def _bin_index(edges: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # side="left" on the inner edges puts a score equal to e_i into bin i - 1: bins are (e_i, e_{i+1}].
        return np.searchsorted(edges[1:-1], scores, side="left")

    def _fit_curve(
        self, scores: np.ndarray, targets: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.binning == "width":
            edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        else:
            inner = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1]))
            edges = np.concatenate([[0.0], inner[(inner > 0.0) & (inner < 1.0)], [1.0]])
        n_bins = edges.size - 1
        index = self._bin_index(edges, scores)
        weights = np.ones_like(scores) if w is None else w
        mass = np.bincount(index, weights=weights, minlength=n_bins)
        hits = np.bincount(index, weights=weights * targets, minlength=n_bins)
        centres = 0.5 * (edges[:-1] + edges[1:])
        values = np.divide(hits, mass, out=centres.copy(), where=mass > 0)
        return edges, np.clip(values, 0.0, 1.0)

    def _set_curves(self, curves: list[tuple[Any, Any]]) -> None:
        self.bin_edges_ = [edges for edges, _ in curves]
        self.bin_values_ = [values for _, values in curves]

    def _apply_curve(self, k: int, scores: np.ndarray) -> np.ndarray:
        return self.bin_values_[k][self._bin_index(self.bin_edges_[k], scores)]

    def _fitted_params(self) -> dict[str, Any]:
        return {
            "bin_edges": [edges.tolist() for edges in self.bin_edges_],
            "bin_values": [values.tolist() for values in self.bin_values_],
        }

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        n_curves = self._n_curves(num_classes)
        for name in ("bin_edges", "bin_values"):
            if not isinstance(params[name], list | tuple) or len(params[name]) != n_curves:
                raise InvalidInput(
                    f"calibrator document params.{name} must be a list of {n_curves} lists", field=name
                )
        edges_list, values_list = [], []
        for k in range(n_curves):
            edges = _doc_array(params["bin_edges"][k], f"bin_edges[{k}]", 1)
            values = _doc_array(params["bin_values"][k], f"bin_values[{k}]", 1)
            if edges.size < 2 or values.size != edges.size - 1:
                raise InvalidInput(
                    f"calibrator document params.bin_values[{k}] must have one entry per bin "
                    f"(len(bin_edges[{k}]) - 1 = {edges.size - 1}), got {values.size}",
                    field="bin_values",
                )
            if (np.diff(edges) < 0).any():
                raise InvalidInput(
                    f"calibrator document params.bin_edges[{k}] must be sorted", field="bin_edges"
                )
            if (values < 0).any() or (values > 1).any():
                raise InvalidInput(
                    f"calibrator document params.bin_values[{k}] must lie in [0, 1]", field="bin_values"
                )
            edges_list.append(edges)
            values_list.append(values)
        self._set_curves(list(zip(edges_list, values_list, strict=True)))


# --------------------------------------------------------------------------------------------------------
# Registry


CALIBRATORS: dict[str, type[BaseCalibrator]] = {
    "temperature": TemperatureScaling,
    "vector": VectorScaling,
    "matrix": MatrixScaling,
    "platt": PlattScaling,
    "isotonic": IsotonicCalibration,
    "histogram": HistogramBinning,
}


def _calibrator_class(method: Any) -> type[BaseCalibrator]:
    try:
        return CALIBRATORS[method]
    except (KeyError, TypeError):
        raise InvalidInput(
            f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATORS)}", field="method"
        ) from None


def make_calibrator(method: str, **options: Any) -> BaseCalibrator:
    """A new, unfitted calibrator of ``method`` with ``options`` (the keyword arguments of its class).

    Raises
    ------
    InvalidInput
        Unknown method, unknown option (named, with the valid ones), or an invalid option value.
    """
    cls = _calibrator_class(method)
    unknown = sorted(set(options) - set(cls._option_names))
    if unknown:
        valid = ", ".join(cls._option_names) if cls._option_names else "none"
        raise InvalidInput(
            f"unknown option {', '.join(map(repr, unknown))} for method {method!r}; its options are: {valid}",
            field=unknown[0],
        )
    return cls(**options)


def calibrator_from_dict(document: Mapping[str, Any]) -> BaseCalibrator:
    """Rebuild a fitted calibrator from its document, dispatching on ``document["method"]``."""
    if not isinstance(document, Mapping):
        raise InvalidInput(f"a calibrator document must be an object, got {type(document).__name__}")
    if "method" not in document:
        raise InvalidInput("calibrator document lacks 'method'", field="method")
    return _calibrator_class(document["method"]).from_dict(document)
