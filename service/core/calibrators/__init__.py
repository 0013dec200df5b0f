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

Modules
-------
:mod:`.base` (the :class:`Calibrator` protocol, :class:`BaseCalibrator`, option and document checks),
:mod:`.temperature` (:class:`TemperatureScaling`; its passes over the logits in :mod:`.temperature_objective`),
:mod:`.affine` (:class:`VectorScaling`, :class:`MatrixScaling`), :mod:`.platt` (:class:`PlattScaling`),
:mod:`.binning` (:class:`IsotonicCalibration`, :class:`HistogramBinning`), :mod:`.venn_abers`
(:class:`VennAbersCalibration`), :mod:`.multilabel`
(:class:`PerLabelCalibration`: a binary calibrator per label of a multi-label model, :data:`MULTILABEL_METHODS`;
its documents have ``"task": "multilabel"``), :mod:`.torch_modules` (the
``torch.nn.Module`` twins that :meth:`BaseCalibrator.torch_module` builds for export). This package
registers the methods (:data:`CALIBRATORS`, :data:`METHODS`). Torch is imported only by a temperature fit,
a large temperature transform or an export, and scipy.optimize and scikit-learn only by the fits that
use them: importing the package (e.g. for :data:`METHODS`) stays light.

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
- V. Vovk, I. Petej, V. Fedorova, "Large-scale probabilistic predictors with and without guarantees of
  validity", NeurIPS 2015 (inductive Venn-Abers predictors, the fast algorithm).
- T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object Detection", ICCV 2017.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from service.core.calibrators.affine import DirichletCalibration, MatrixScaling, VectorScaling
from service.core.calibrators.base import BaseCalibrator, Calibrator
from service.core.calibrators.beta import BetaCalibration
from service.core.calibrators.binning import HistogramBinning, IsotonicCalibration
from service.core.calibrators.ensemble import EnsembleTemperatureScaling
from service.core.calibrators.multilabel import (
    MULTILABEL_METHODS,
    PerLabelCalibration,
    is_multilabel_document,
)
from service.core.calibrators.platt import PlattScaling
from service.core.calibrators.segment_temperature import SegmentTemperatureScaling
from service.core.calibrators.temperature import TemperatureScaling
from service.core.calibrators.venn_abers import VennAbersCalibration
from service.errors import InvalidInput, as_parameters

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

__all__ = [
    "CALIBRATORS",
    "METHODS",
    "MULTILABEL_METHODS",
    "BaseCalibrator",
    "BetaCalibration",
    "Calibrator",
    "DirichletCalibration",
    "EnsembleTemperatureScaling",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "PerLabelCalibration",
    "PlattScaling",
    "SegmentTemperatureScaling",
    "TemperatureScaling",
    "VectorScaling",
    "VennAbersCalibration",
    "calibrator_from_dict",
    "calibrator_module",
    "make_calibrator",
]


CALIBRATORS: dict[str, type[BaseCalibrator]] = {
    "temperature": TemperatureScaling,
    "vector": VectorScaling,
    "matrix": MatrixScaling,
    "platt": PlattScaling,
    "isotonic": IsotonicCalibration,
    "histogram": HistogramBinning,
    "beta": BetaCalibration,
    "ensemble_temperature": EnsembleTemperatureScaling,
    "dirichlet": DirichletCalibration,
    "segment_temperature": SegmentTemperatureScaling,
    "venn_abers": VennAbersCalibration,
}
# The method names, in the registry's order (CLI choices, API docs).
METHODS: tuple[str, ...] = tuple(CALIBRATORS)


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
    InvalidParameter
        Unknown method, unknown option (named, with the valid ones), or an invalid option value: the
        request's parameters are wrong, not its data (HTTP 422, CLI exit 2).
    """
    with as_parameters():
        cls = _calibrator_class(method)
        unknown = sorted(set(options) - set(cls._option_names))
        if unknown:
            valid = ", ".join(cls._option_names) if cls._option_names else "none"
            raise InvalidInput(
                f"unknown option {', '.join(map(repr, unknown))} for method {method!r}; its options are: "
                f"{valid}",
                field=unknown[0],
            )
        return cls(**options)


def calibrator_from_dict(document: Mapping[str, Any]) -> BaseCalibrator:
    """Rebuild a fitted calibrator from its document, dispatching on ``document["method"]``."""
    if not isinstance(document, Mapping):
        raise InvalidInput(f"a calibrator document must be an object, got {type(document).__name__}")
    if "method" not in document:
        raise InvalidInput("calibrator document lacks 'method'", field="method")
    if is_multilabel_document(document):  # a multi-label model's: a binary calibrator per label
        return PerLabelCalibration.from_dict(document)
    return _calibrator_class(document["method"]).from_dict(document)


def calibrator_module(calibrator: Calibrator | None) -> torch.nn.Module:
    """A ``torch.nn.Module`` mapping logits to the probabilities ``calibrator.transform`` gives.

    ``calibrator`` is a fitted calibrator (its :meth:`~BaseCalibrator.torch_module`), or None for the plain
    softmax (identity calibration). Raises InvalidInput for a method that cannot be exported.
    """
    if calibrator is None:
        from service.core.calibrators.torch_modules import SoftmaxModule

        return SoftmaxModule()
    build = getattr(calibrator, "torch_module", None)
    if build is None:
        method = getattr(calibrator, "method", None)
        raise InvalidInput(f"calibration method {method!r} cannot be exported to TorchScript")
    return build()
