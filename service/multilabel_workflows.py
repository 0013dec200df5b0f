"""Use cases of multi-label models (``task = "multilabel"``), shared by the HTTP API and the CLI: fit a
document, calibrate, evaluate (with drift against the fit-time figures).

The multiclass use cases are in :mod:`service.workflows`; this module keeps the multi-label ones apart so
the two cannot change each other's answers. Its documents and reports have the same envelope
(``format_version``, ``fit.before``/``fit.after``, ``uncalibrated``/``calibrated``, ``drift``) and add
``"task": "multilabel"``. A group of figures (:func:`group_figures`) holds the headline figures ``ece``,
``mce``, ``brier``, ``nll`` as their **macro** averages over labels (so ``--fail-on ece>0.05``, drift rules
and baselines read them as for any model), the micro averages as ``ece_micro`` ..., and ``per_label``,
``macro`` and ``micro`` in full (:func:`service.core.multilabel.label_figures` states the conventions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from service.core.calibrators import PerLabelCalibration
from service.core.multilabel import (
    FIGURES,
    MULTILABEL,
    check_label_count,
    check_label_matrix,
    check_label_probabilities,
    json_figures,
    label_figures,
    probability_logits,
    sigmoid,
)
from service.core.validation import as_float_matrix, check_logits, check_sample_weight
from service.errors import InvalidInput, as_parameters
from service.workflows import FORMAT_VERSION, REPORT_KIND, data_sha256, drift_against_fit, has_fit_figures

__all__ = [
    "calibrate",
    "evaluate",
    "fit_document",
    "group_figures",
    "is_multilabel",
    "scores_to_logits",
]


def is_multilabel(task: Any) -> bool:
    return task == MULTILABEL


def scores_to_logits(scores: Any, *, from_logits: bool, transform: bool = False) -> np.ndarray:
    """Per-label logits: as given (validated), or the logit of each per-label probability (which need not
    sum to 1 over a row).

    ``transform`` (the logits are to be calibrated): every finite logit is accepted, and none is scaled
    here; each label's calibrator scales its own column's logits beyond ``MAX_ABS_LOGIT`` (a row-wise scale
    would move the other labels of the row).
    """
    if from_logits:
        return as_float_matrix(scores, "logits") if transform else check_logits(scores)
    return probability_logits(check_label_probabilities(scores))


def group_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """One group of a multi-label document or report from :func:`label_figures`' answer: headline figures
    (macro), ``<figure>_micro``, ``per_label``, ``macro``, ``micro``, ``n``, ``n_labels``; JSON-safe."""
    group: dict[str, Any] = {name: report["macro"][name] for name in FIGURES}
    group.update({f"{name}_micro": report["micro"][name] for name in FIGURES})
    group.update(
        {
            "n": report["n"],
            "n_labels": report["n_labels"],
            "macro": report["macro"],
            "micro": report["micro"],
            "per_label": report["per_label"],
            "conventions": {**report["conventions"], "headline": "ece, mce, brier, nll are macro averages"},
        }
    )
    return json_figures(group)


def fit_document(
    scores: Any,
    labels: Any,
    *,
    from_logits: bool = True,
    method: str = "temperature",
    options: Mapping[str, Any] | None = None,
    model: str | None = None,
    num_labels: int | None = None,
    sample_weight: Any = None,
) -> dict[str, Any]:
    """Fit a per-label calibrator (:class:`PerLabelCalibration`) and return its document, with the fit-time
    figures of the logits (``fit.before``) and of the calibrated probabilities (``fit.after``)."""
    logits = scores_to_logits(scores, from_logits=from_logits)
    check_label_count(logits.shape[1], num_labels, "logits" if from_logits else "probabilities")
    y = check_label_matrix(labels, logits.shape[0], logits.shape[1])
    weight = check_sample_weight(sample_weight, logits.shape[0])
    with as_parameters():  # the method and its options: 422, as for every other model
        calibrator = PerLabelCalibration(method, **dict(options or {}))
    calibrator.fit(logits, y, sample_weight=weight, validate=False)
    before = label_figures(y, logits=logits)
    after = label_figures(y, probabilities=calibrator.transform(logits, validate=False))
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "version": None,
        **calibrator.to_dict(),
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fit": {
            "n": int(logits.shape[0]),
            "data_sha256": data_sha256(logits, y),
            "before": group_figures(before),
            "after": group_figures(after),
        },
    }


def calibrate(calibrator: Any | None, scores: Any, *, from_logits: bool = True) -> np.ndarray:
    """K calibrated probabilities per row; without a calibrator, the sigmoid of each logit."""
    logits = scores_to_logits(scores, from_logits=from_logits, transform=True)
    if calibrator is None:
        return sigmoid(logits)
    if getattr(calibrator, "task", None) != MULTILABEL:
        raise InvalidInput(
            f"calibrator method {getattr(calibrator, 'method', None)!r} is not a multi-label calibrator; "
            "fit one for this multi-label model",
            field="calibrator",
        )
    return calibrator.transform(logits)


def evaluate(
    scores: Any,
    labels: Any,
    *,
    from_logits: bool = True,
    calibrator: Any | None = None,
    calibrator_document: Mapping[str, Any] | None = None,
    n_bins: int = 15,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The evaluation report of a multi-label model: figures of the scores (``uncalibrated``) and, with a
    calibrator, of its answer (``calibrated``), each a :func:`group_figures` group; the reliability bins of
    every label (``reliability_per_label``: ``uncalibrated`` and ``calibrated``, one list of non-empty bins
    per label); ``drift`` against the calibrator's fit-time figures when its document has them.
    ``label_names`` (the model's class names, one per label) name each ``per_label`` entry."""
    if from_logits:
        logits = scores_to_logits(scores, from_logits=True)
        uncalibrated = {"logits": logits}
    else:
        probabilities = check_label_probabilities(scores)
        logits = probability_logits(probabilities)
        uncalibrated = {"probabilities": probabilities}
    check_label_count(logits.shape[1], num_labels, "logits" if from_logits else "probabilities")
    y = check_label_matrix(labels, logits.shape[0], logits.shape[1])
    names = list(label_names) if label_names and len(label_names) == logits.shape[1] else None
    before = label_figures(y, n_bins=n_bins, label_names=names, **uncalibrated)
    report: dict[str, Any] = {
        "kind": REPORT_KIND,
        "format_version": FORMAT_VERSION,
        "task": MULTILABEL,
        "n": int(logits.shape[0]),
        "n_labels": int(logits.shape[1]),
        "num_classes": int(logits.shape[1]),  # the model's outputs, as reports name them
        "uncalibrated": group_figures(before),
        "reliability_per_label": {"uncalibrated": before["reliability"]},
    }
    if calibrator is not None:
        after = label_figures(
            y, probabilities=calibrate(calibrator, logits), n_bins=n_bins, label_names=names
        )
        report["calibrated"] = group_figures(after)
        report["reliability_per_label"]["calibrated"] = after["reliability"]
        report["calibrator"] = {
            "method": getattr(calibrator, "method", None),
            "version": (calibrator_document or {}).get("version"),
        }
    if calibrator_document is not None and has_fit_figures(calibrator_document):
        report["drift"] = drift_against_fit(report, calibrator_document)
    return json_figures(report)
