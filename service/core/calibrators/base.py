"""The calibrator protocol, the shared base class and the option/document checks every method uses.

See :mod:`service.core.calibrators` for the conventions (columns, classes, the document format).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np

from service.core.validation import (
    check_labels,
    check_logits,
    check_sample_weight,
    n_label_classes,
)
from service.errors import InvalidInput, NotFitted

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch


@runtime_checkable
class Calibrator(Protocol):
    """What the service needs from a calibrator (every class in :data:`CALIBRATORS` implements it)."""

    method: ClassVar[str]

    @property
    def params(self) -> dict[str, Any]: ...

    def fit(self, logits: Any, labels: Any, *, sample_weight: Any = None, validate: bool = True) -> Self: ...

    def transform(self, logits: Any, *, validate: bool = True) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Self: ...

    def torch_module(self) -> torch.nn.Module: ...


# --------------------------------------------------------------------------------------------------------
# Option and document checks


def _check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    where: str = "option",
) -> float:
    """A finite real number (bools refused), optionally ``>= minimum`` (``> minimum`` when ``strict``) and
    ``<= maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidInput(f"{where} {name} must be a number, got {value!r}", field=name)
    try:
        number = float(value)
    except OverflowError:  # a Python int beyond float64
        raise InvalidInput(f"{where} {name} must be finite, got {value!r}", field=name) from None
    if not math.isfinite(number):
        raise InvalidInput(f"{where} {name} must be finite, got {value!r}", field=name)
    if minimum is not None and (number <= minimum if strict else number < minimum):
        relation = ">" if strict else ">="
        raise InvalidInput(f"{where} {name} must be {relation} {minimum:g}, got {value!r}", field=name)
    if maximum is not None and number > maximum:
        raise InvalidInput(f"{where} {name} must be <= {maximum:g}, got {value!r}", field=name)
    return number


def _check_magnitude(value: float, name: str, limit: float, *, where: str = "calibrator document") -> float:
    """``value`` with ``|value| <= limit`` (a fitted parameter's range); InvalidInput naming the limit."""
    if not abs(value) <= limit:
        raise InvalidInput(
            f"{where} {name} = {value:g} is outside [-{limit:g}, {limit:g}], the range of this parameter",
            field=name,
        )
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidInput(f"option {name} must be true or false, got {value!r}", field=name)
    return bool(value)


def _doc_array(value: Any, name: str, ndim: int, *, max_abs: float | None = None) -> np.ndarray:
    """A finite float64 array of ``ndim`` dimensions read from a document's ``params`` (entries within
    ``[-max_abs, max_abs]`` when given)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"calibrator document params.{name} must be a rectangular list of numbers", field=name
        ) from None
    if array.ndim != ndim:
        raise InvalidInput(
            f"calibrator document params.{name} must be {ndim}-D, got shape {array.shape}", field=name
        )
    if not np.isfinite(array).all():
        raise InvalidInput(f"calibrator document params.{name} holds NaN or Inf", field=name)
    if max_abs is not None and array.size and np.abs(array).max() > max_abs:
        raise InvalidInput(
            f"calibrator document params.{name} holds {np.abs(array).max():g} in magnitude, outside "
            f"[-{max_abs:g}, {max_abs:g}], the range of this parameter",
            field=name,
        )
    return array


def _doc_shape(array: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape != shape:
        raise InvalidInput(
            f"calibrator document params.{name} must have shape {shape}, got {array.shape}", field=name
        )
    return array


def _doc_curves(
    params: Mapping[str, Any], x_name: str, y_name: str, n_curves: int, *, monotone: bool = False
) -> tuple[list, list]:
    """Per-class piecewise curves (knots ``x`` increasing in [0, 1], values ``y`` in [0, 1], non-decreasing
    too when ``monotone``) of a document."""
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
        if (x < 0).any() or (x > 1).any():
            raise InvalidInput(
                f"calibrator document params.{x_name}[{k}] must lie in [0, 1] (they are probabilities)",
                field=x_name,
            )
        if (y < 0).any() or (y > 1).any():
            raise InvalidInput(f"calibrator document params.{y_name}[{k}] must lie in [0, 1]", field=y_name)
        if monotone and (np.diff(y) < 0).any():
            raise InvalidInput(
                f"calibrator document params.{y_name}[{k}] must be non-decreasing (an isotonic map is monotone)",
                field=y_name,
            )
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
        self, logits: Any, labels: Any, sample_weight: Any, *, validate: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        z = check_logits(logits) if validate else logits
        n_classes = n_label_classes(z.shape[1])
        if self._binary_only and n_classes != 2:
            raise InvalidInput(
                f"{self._label} is binary only; got {n_classes} classes "
                "(logits need 1 column, the logit of class 1, or 2 columns)",
                field="logits",
            )
        if validate:
            y = check_labels(labels, z.shape[0], z.shape[1])
            w = check_sample_weight(sample_weight, z.shape[0])
        else:
            y, w = labels, sample_weight
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
        z = check_logits(logits, scale=True)  # every finite row gets an answer (rows beyond 1e100 scaled)
        if n_label_classes(z.shape[1]) != self.num_classes_:
            raise InvalidInput(
                f"calibrator was fitted on {self.num_classes_} classes; "
                f"logits have {_plural(z.shape[1], 'column')}",
                field="logits",
            )
        return z

    # -- protocol -----------------------------------------------------------------------------------------

    def fit(self, logits: Any, labels: Any, *, sample_weight: Any = None, validate: bool = True) -> Self:
        """Learn the calibration map from labelled logits.

        Parameters
        ----------
        logits : array-like or torch.Tensor of shape (n_samples, n_columns)
            Raw scores; one column is the logit of class 1 of a binary model.
        labels : array-like of shape (n_samples,)
            Integer classes in ``[0, num_classes)``.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights; the loss is their weighted mean.
        validate : bool, default=True
            ``False`` skips the checks of the arrays themselves (finite 2-D logits, labels in range,
            weights): pass it only with what :func:`service.core.validation.check_labelled` returned (a
            2-D float numpy array, int64 labels, float64 weights or None). The method's own checks (binary
            only, two classes present) still run.

        Returns
        -------
        self
        """
        z, y, w = self._check_fit_input(logits, labels, sample_weight, validate=validate)
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
        probabilities = self._transform(z)
        # One sum over the answer: a NaN or Inf anywhere makes it non-finite. Parameters and logits are
        # bounded so that this cannot happen; should it, the row is named instead of answered.
        if not math.isfinite(float(probabilities.sum())):
            _raise_non_finite(probabilities, self._label)
        return probabilities

    def fit_transform(self, logits: Any, labels: Any, *, sample_weight: Any = None) -> np.ndarray:
        """``fit`` then ``transform`` on the same logits."""
        return self.fit(logits, labels, sample_weight=sample_weight).transform(logits)

    def to_dict(self) -> dict[str, Any]:
        """The fitted calibrator as a JSON-safe document (see :mod:`service.core.calibrators`)."""
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

    def torch_module(self) -> torch.nn.Module:
        """A ``torch.nn.Module`` mapping logits ``(N, C)`` to the probabilities :meth:`transform` gives.

        It computes in float64 with the same formulas (one logit column read as the binary ``[0, z]``) and
        answers float64 for float64 logits, float32 otherwise; it can be compiled to TorchScript (see
        :mod:`service.export`). Methods that cannot be exported raise :class:`InvalidInput`.
        """
        raise InvalidInput(f"calibration method {self.method!r} cannot be exported to TorchScript")

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


def _raise_non_finite(probabilities: np.ndarray, label: str) -> None:
    bad = ~np.isfinite(probabilities)
    rows = np.flatnonzero(bad.any(axis=1)) if bad.any() else np.array([0])
    row = int(rows[0])
    raise InvalidInput(
        f"{label} cannot calibrate logits row {row}: the calibrated probabilities overflow there",
        field="logits",
        row=row,
    )


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
