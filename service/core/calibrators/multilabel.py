r"""Calibrators of multi-label models: one binary calibrator per label (or one shared by every label).

A multi-label model's K logits are K independent binary problems, ``P(y_k = 1) = sigmoid(z_k)``; column
``k`` alone is the single-column binary logit the binary calibrators of this package already take (their
``[0, z]`` convention). :class:`PerLabelCalibration` therefore reuses them unchanged, one per column:

- ``temperature``: a temperature per label, ``sigmoid(z_k / T_k)`` (:class:`TemperatureScaling` on column k);
- ``shared_temperature``: one temperature for every label, ``sigmoid(z_k / T)``, fitted on all
  ``(row, label)`` pairs pooled (:class:`TemperatureScaling` on the flattened column, so its NLL is the
  micro-averaged binary cross-entropy);
- ``platt``: ``sigmoid(a_k z_k + b_k)`` per label (:class:`PlattScaling`);
- ``isotonic``: an isotonic map of ``sigmoid(z_k)`` per label (:class:`IsotonicCalibration`, its probability
  floor included).

Options are those of the binary method and apply to every label. Transforms answer ``(n_samples, K)``
float64 probabilities in [0, 1] whose rows need not sum to 1.

Document format
---------------
``{"method": <one of MULTILABEL_METHODS>, "task": "multilabel", "num_classes": K, "num_labels": K,
"params": {"labels": [one binary document per label]} (shared_temperature: {"shared": <one document>}),
"convergence": {"converged": all labels converged, "labels": [each label's convention record]}}``;
``shared_temperature`` also has ``"temperature": T`` at the top level. ``num_classes`` counts the model's
outputs (the labels), as the service's column checks read it.

References
----------
- C. Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling).
- J. Platt, "Probabilistic Outputs for Support Vector Machines ...", 1999.
- B. Zadrozny, C. Elkan, "Transforming classifier scores into accurate multiclass probability estimates",
  KDD 2002 (isotonic regression).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from service.core import cancellation
from service.core.calibrators.base import BaseCalibrator, _json_number
from service.core.calibrators.binning import IsotonicCalibration
from service.core.calibrators.platt import PlattScaling
from service.core.calibrators.temperature import TemperatureScaling
from service.core.multilabel import MULTILABEL, check_label_matrix
from service.core.validation import as_float_matrix, check_logits, check_sample_weight
from service.errors import InvalidInput, NotFitted

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

MULTILABEL_METHODS: dict[str, type[BaseCalibrator]] = {
    "temperature": TemperatureScaling,
    "shared_temperature": TemperatureScaling,
    "platt": PlattScaling,
    "isotonic": IsotonicCalibration,
}
"""The methods of a multi-label model and the binary calibrator each applies per label."""
MAX_LABELS = 1_000
"""Most labels of a multi-label calibrator (one binary fit each, and one document each)."""


def check_multilabel_method(method: Any) -> str:
    if method not in MULTILABEL_METHODS:
        raise InvalidInput(
            f"method {method!r} is not available for a multi-label model; choose one of "
            f"{', '.join(MULTILABEL_METHODS)}",
            field="method",
        )
    return method


class PerLabelCalibration:
    """A binary calibrator per label of a multi-label model (or one shared by all labels).

    Parameters
    ----------
    method : {"temperature", "shared_temperature", "platt", "isotonic"}, default="temperature"
        See the module's list.
    **options
        Options of the binary calibrator (e.g. ``smooth_targets`` for ``platt``, ``floor`` for
        ``isotonic``, ``bounds`` for the temperatures), applied to every label.

    Attributes
    ----------
    calibrators_ : list of BaseCalibrator
        One fitted binary calibrator per label (the same object K times for ``shared_temperature``).
    num_classes_ : int
        The number of labels K.
    convergence_ : dict
        ``converged`` (every label's fit converged) and ``labels`` (each label's record; one for shared).
    """

    task: ClassVar[str] = MULTILABEL

    calibrators_: list[BaseCalibrator]
    num_classes_: int
    convergence_: dict[str, Any]

    def __init__(self, method: str = "temperature", **options: Any) -> None:
        self.method = check_multilabel_method(method)
        self._binary_class = MULTILABEL_METHODS[method]
        unknown = sorted(set(options) - set(self._binary_class._option_names))
        if unknown:
            valid = ", ".join(self._binary_class._option_names) or "none"
            raise InvalidInput(
                f"unknown option {', '.join(map(repr, unknown))} for multi-label method {method!r}; its "
                f"options are: {valid}",
                field=unknown[0],
            )
        self._prototype = self._binary_class(**options)  # checks the option values now
        self.options = dict(options)

    # -- fitted state ---------------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        return self.method == "shared_temperature"

    @property
    def params(self) -> dict[str, Any]:
        return self._prototype.get_params()

    def get_params(self) -> dict[str, Any]:
        return self.params

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "num_classes_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFitted(f"this multi-label {self.method} calibrator is not fitted yet: call fit first")

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"PerLabelCalibration(method={self.method!r}{', ' if options else ''}{options})"

    # -- protocol -------------------------------------------------------------------------------------

    def fit(self, logits: Any, labels: Any, *, sample_weight: Any = None, validate: bool = True) -> Self:
        """Fit on logits ``(n, K)`` and labels (a 0/1 matrix ``(n, K)`` or lists of label indices).

        ``validate=False`` takes validated arrays as they are (float logits, the int8 label matrix, float64
        weights or None).
        """
        if validate:
            z = check_logits(logits)
            y = check_label_matrix(labels, z.shape[0], z.shape[1])
            w = check_sample_weight(sample_weight, z.shape[0])
        else:
            z, y, w = logits, labels, sample_weight
        n_labels = z.shape[1]
        if n_labels > MAX_LABELS:
            raise InvalidInput(
                f"a multi-label calibrator takes at most {MAX_LABELS:,} labels; logits have {n_labels:,}",
                field="logits",
            )
        new = self._binary_class
        if self.shared:
            flat_w = None if w is None else np.repeat(w, n_labels)
            shared = new(**self.options).fit(
                z.reshape(-1, 1), y.reshape(-1).astype(np.int64), sample_weight=flat_w, validate=False
            )
            self.calibrators_ = [shared] * n_labels
            records = [shared.convergence_]
        else:
            self.calibrators_ = []
            for k in range(n_labels):
                cancellation.check()
                try:
                    fitted = new(**self.options).fit(
                        np.ascontiguousarray(z[:, k : k + 1]),
                        y[:, k].astype(np.int64),
                        sample_weight=w,
                        validate=False,
                    )
                except InvalidInput as error:
                    raise InvalidInput(f"label {k}: {error}", field="labels") from None
                self.calibrators_.append(fitted)
            records = [c.convergence_ for c in self.calibrators_]
        self.num_classes_ = n_labels
        self.convergence_ = {
            "converged": all(bool(r.get("converged", True)) for r in records),
            "labels": records,
        }
        return self

    def transform(self, logits: Any, *, validate: bool = True) -> np.ndarray:
        """Calibrated ``P(y_k = 1)``, float64 ``(n_samples, K)`` in [0, 1]; rows need not sum to 1.

        Each column is calibrated on its own (a logit beyond ``MAX_ABS_LOGIT`` is scaled into it alone).
        """
        self._check_fitted()
        z = as_float_matrix(logits, "logits") if validate else logits
        if z.shape[1] != self.num_classes_:
            raise InvalidInput(
                f"calibrator was fitted on {self.num_classes_} labels; logits have {z.shape[1]} columns",
                field="logits",
            )
        out = np.empty(z.shape, dtype=np.float64)
        for k, calibrator in enumerate(self.calibrators_):
            out[:, k] = calibrator.transform(z[:, k : k + 1])[:, 1]
        return out

    def fit_transform(self, logits: Any, labels: Any, *, sample_weight: Any = None) -> np.ndarray:
        return self.fit(logits, labels, sample_weight=sample_weight).transform(logits)

    @property
    def temperatures_(self) -> np.ndarray:
        """Each label's temperature (temperature methods only)."""
        self._check_fitted()
        return np.array([c.temperature_ for c in self.calibrators_])  # type: ignore[attr-defined]

    # -- documents ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        if self.shared:
            params: dict[str, Any] = {"shared": self.calibrators_[0].to_dict()}
        else:
            params = {"labels": [c.to_dict() for c in self.calibrators_]}
        document: dict[str, Any] = {
            "method": self.method,
            "task": MULTILABEL,
            "params": params,
            "options": dict(self.options),
            "num_classes": int(self.num_classes_),
            "num_labels": int(self.num_classes_),
            "convergence": _json_safe(self.convergence_),
        }
        if self.shared:
            document = {"method": self.method, "temperature": self.calibrators_[0].temperature_, **document}  # type: ignore[attr-defined]
        return document

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Self:
        """Rebuild from :meth:`to_dict`'s document, checking each label's binary document."""
        if not isinstance(document, Mapping):
            raise InvalidInput(f"a calibrator document must be an object, got {type(document).__name__}")
        if document.get("task") != MULTILABEL:
            raise InvalidInput("calibrator document is not a multi-label one (task)", field="task")
        method = check_multilabel_method(document.get("method"))
        options = document.get("options") or {}
        if not isinstance(options, Mapping):
            raise InvalidInput("calibrator document options must be an object", field="options")
        calibrator = cls(method, **options)
        n_labels = document.get("num_labels", document.get("num_classes"))
        if isinstance(n_labels, bool) or not isinstance(n_labels, int) or not 1 <= n_labels <= MAX_LABELS:
            raise InvalidInput(
                f"calibrator document num_labels must be an integer in [1, {MAX_LABELS}], got {n_labels!r}",
                field="num_labels",
            )
        if document.get("num_classes", n_labels) != n_labels:
            raise InvalidInput("calibrator document num_classes and num_labels disagree", field="num_classes")
        params = document.get("params")
        if not isinstance(params, Mapping):
            raise InvalidInput("calibrator document params must be an object", field="params")
        binary = calibrator._binary_class
        if calibrator.shared:
            if "shared" not in params:
                raise InvalidInput("calibrator document params lacks 'shared'", field="params")
            shared = binary.from_dict(params["shared"])
            if "temperature" in document and document["temperature"] != shared.temperature_:  # type: ignore[attr-defined]
                raise InvalidInput(
                    "calibrator document temperature disagrees with params.shared", field="temperature"
                )
            calibrator.calibrators_ = [shared] * n_labels
        else:
            per_label = params.get("labels")
            if not isinstance(per_label, list) or len(per_label) != n_labels:
                raise InvalidInput(
                    f"calibrator document params.labels must be a list of {n_labels} documents",
                    field="params",
                )
            calibrator.calibrators_ = []
            for k, entry in enumerate(per_label):
                try:
                    calibrator.calibrators_.append(binary.from_dict(entry))
                except InvalidInput as error:
                    raise InvalidInput(
                        f"calibrator document params.labels[{k}]: {error}", field="params"
                    ) from None
        for k, fitted in enumerate(calibrator.calibrators_):
            if fitted.num_classes_ != 2:
                raise InvalidInput(
                    f"calibrator document params.labels[{k}] must be binary (num_classes 2)", field="params"
                )
        convergence = document.get("convergence") or {}
        calibrator.convergence_ = dict(convergence) if isinstance(convergence, Mapping) else {}
        calibrator.num_classes_ = n_labels
        return calibrator

    def torch_module(self) -> torch.nn.Module:
        """A module mapping logits ``(N, K)`` to the per-label probabilities :meth:`transform` gives."""
        self._check_fitted()
        from service.core.calibrators.torch_modules import PerLabelModule

        return PerLabelModule([c.torch_module() for c in self.calibrators_])


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    value = _json_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_multilabel_document(document: Any) -> bool:
    """Whether a calibrator document is a multi-label model's (``"task": "multilabel"``)."""
    return isinstance(document, Mapping) and document.get("task") == MULTILABEL
