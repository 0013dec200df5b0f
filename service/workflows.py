"""Use cases shared by the HTTP API and the CLI: fit, calibrate, evaluate, thresholds and drift.

Functions here take arrays and plain dicts and return plain dicts (JSON-safe), so that a CLI report file, an
HTTP answer and a stored calibrator version are the same document.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from service.core import conformal as conformal_core
from service.core import metrics
from service.core.calibration_tests import P_VALUES
from service.core.calibrators import TemperatureScaling, calibrator_from_dict, make_calibrator
from service.core.monitoring import confidence_histogram
from service.core.probability import log_softmax, softmax
from service.core.segments import DEFAULT_MIN_SEGMENT_SIZE, check_segments
from service.core.validation import (
    MAX_ABS_LOGIT,
    check_labelled,
    check_logits,
    check_probabilities,
    same_class_count,
)
from service.errors import InvalidInput, InvalidParameter

FORMAT_VERSION = 1
REPORT_KIND = "calibserve.evaluation"
HEADLINE_FIGURES = ("ece", "mce", "brier", "nll", "accuracy")
# Calibrated probabilities are floored here before their log (a true class of probability 0 costs a finite
# 690.8 nats in the fit-time and evaluation NLL, not infinity).
_PROBABILITY_FLOOR = 1e-300
# Fit data of at least this many bytes of logits is hashed, and its 'before' figures computed, in a second
# thread alongside the fit.
_SECOND_THREAD_BYTES = 1 << 20


def data_sha256(scores: np.ndarray, labels: np.ndarray) -> str:
    """Hash of the fit data (shape, dtype and bytes of scores and labels) to trace a version to its data."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(scores), np.ascontiguousarray(labels)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))  # the bytes tobytes() gives, without copying them
    return digest.hexdigest()


def scores_to_logits(scores: Any, *, from_logits: bool, transform: bool = False) -> np.ndarray:
    """Calibrators work on logits: probabilities are mapped to their log (softmax is shift-invariant).

    ``transform``: the logits are to be calibrated, not fitted on or evaluated, so rows beyond
    ``MAX_ABS_LOGIT`` are scaled into it (:func:`~service.core.validation.scale_into_domain`), not refused.
    """
    if from_logits:
        return check_logits(scores, scale=transform)
    return probability_logits(check_probabilities(scores))


def probability_logits(probabilities: np.ndarray) -> np.ndarray:
    """Logits whose softmax is ``probabilities`` (validated), for calibrators to work on.

    A probability of 0 has no logit: it is floored at 1e-300 here (log 1e-300 = -690.8), which changes the
    softmax by less than 1e-300. Figures are never computed from these logits (:func:`evaluate` scores the
    probabilities themselves), so the floor never reaches an NLL.
    """
    if probabilities.shape[1] == 1:  # binary P(y=1): its logit is log(p / (1 - p))
        p = np.clip(probabilities.astype(np.float64), _PROBABILITY_FLOOR, 1.0)
        q = np.clip(1.0 - probabilities.astype(np.float64), _PROBABILITY_FLOOR, 1.0)
        return np.log(p) - np.log(q)
    return np.log(np.clip(probabilities.astype(np.float64), _PROBABILITY_FLOOR, None))


def figures(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    from_logits: bool = True,
    n_bins: int = 15,
    binning: str = "width",
    nll_clip: float | None = None,
    ece_convention: str | None = None,
) -> dict:
    """The headline figures (ece, mce, brier, nll, accuracy and variants) of softmax(logits), or of
    probabilities (``from_logits=False``); NLL exact unless ``nll_clip``; ``ece_<convention>`` with
    ``ece_convention``."""
    return metrics.calibration_report(
        scores,
        labels,
        from_logits=from_logits,
        n_bins=n_bins,
        binning=binning,
        nll_clip=nll_clip,
        ece_convention=ece_convention,
    )


def fit_document(
    scores: Any,
    labels: Any,
    *,
    from_logits: bool = True,
    method: str = "temperature",
    options: Mapping[str, Any] | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    sample_weight: Any = None,
    segments: Any = None,
) -> dict:
    """Fit a calibrator and return its document (the one format used by CLI files, the store and the API).

    The data is validated once. The fit-time figures (``fit.before``: of the logits, ``fit.after``: of the
    calibrated probabilities) are :func:`fit_time_figures`: the figures that drift checks compare
    (:data:`HEADLINE_FIGURES`), overconfidence and underconfidence, ``n`` and ``conventions``, each equal
    to that of :func:`figures` (``after``: of ``calibrated_logits(calibrator, logits)``) to rounding. The
    ECE variants (``ece_l2``, ``ece_debiased``, ``ece_mass``, ``ece_classwise``) are not stored: they
    cost more than the fit itself (the classwise and equal-mass binning of two N x K probability
    matrices) and nothing compares them with later data; an evaluation computes them. The data's SHA-256
    and the ``before`` figures are computed in a second thread while the fit runs (from 1 MB of logits).
    ``fit.reliability`` (:func:`fit_reliability`) holds the bins of those ``ece`` figures, before and after:
    the reliability diagram of the version on its fit data, drawn without the data.
    """
    # logits are checked by check_labelled (once); probabilities by scores_to_logits, which maps them
    logits = scores if from_logits else scores_to_logits(scores, from_logits=False)
    logits, y, weight = check_labelled(logits, labels, from_logits=True, sample_weight=sample_weight)
    if num_classes is not None and not same_class_count(logits.shape[1], num_classes):
        raise InvalidInput(
            f"model {model!r} has {num_classes} classes but the data has {logits.shape[1]} columns",
            field="logits",
        )
    calibrator = make_calibrator(method, **dict(options or {}))
    if segments is not None and not hasattr(calibrator, "transform_segments"):
        raise InvalidInput(
            f"segments are for method segment_temperature (a temperature per segment); method {method!r} "
            "takes none",
            field="segments",
        )
    segmented = () if segments is None else (segments,)  # fit's third argument, for a segment calibrator
    if logits.nbytes < _SECOND_THREAD_BYTES:
        digest = data_sha256(logits, y)
        calibrator.fit(logits, y, *segmented, sample_weight=weight, validate=False)
        before, after = fit_time_figures(calibrator, logits, y, segments=segments, reliability=True)
    else:
        # the hash and the 'before' figures depend on the data alone: a second thread does them during the
        # fit (hashlib and numpy's loops let go of the GIL)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibserve-fit-data") as pool:
            data_work = pool.submit(_hash_and_figures, logits, y)
            calibrator.fit(logits, y, *segmented, sample_weight=weight, validate=False)
            digest, before = data_work.result()
            before, after = fit_time_figures(
                calibrator, logits, y, before, segments=segments, reliability=True
            )
    reliability = fit_reliability(before, after)
    document = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "version": None,
        **calibrator.to_dict(),
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fit": {
            "n": int(logits.shape[0]),
            "data_sha256": digest,
            "before": before,
            "after": after,
            "confidence_histogram": fit_confidence_histogram(calibrator, logits, segments),
            "reliability": reliability,
        },
    }
    return document


def fit_reliability(before: dict, after: dict) -> dict:
    """A document's ``fit.reliability``, taken out of the fit-time figures computed with
    ``reliability=True`` (:func:`service.core.metrics.fit_figures`): the ``n_bins`` equal-width top-label
    bins of their ``ece``, per bin ``counts``, ``mean_confidence`` and ``accuracy`` (null in an empty bin),
    ``before`` and ``after`` calibration."""
    return {
        "kind": "top_label",
        "binning": "width",
        "n_bins": before["conventions"]["n_bins"],
        "before": before.pop("reliability"),
        "after": after.pop("reliability"),
    }


_RELIABILITY_GROUPS = {"before": "uncalibrated", "after": "calibrated"}
MAX_STORED_BINS = 1000


def check_fit_reliability(reliability: Any, n: Any = None) -> None:
    """Refuse a malformed ``fit.reliability`` (:func:`fit_reliability`) of a calibrator document: equal-width
    top-label bins, ``before`` and/or ``after`` each with ``n_bins`` counts (summing to the fit's ``n`` where
    the document gives it) and means, null exactly in the empty bins, each mean confidence within its bin."""
    field = "fit.reliability"
    if not isinstance(reliability, Mapping):
        raise InvalidInput(f"{field} must be an object", field=field)
    if reliability.get("kind", "top_label") != "top_label" or reliability.get("binning", "width") != "width":
        raise InvalidInput(
            f"{field} holds equal-width top-label bins (kind top_label, binning width)", field=field
        )
    n_bins = reliability.get("n_bins")
    if not _is_int(n_bins) or not 1 <= n_bins <= MAX_STORED_BINS:
        raise InvalidInput(
            f"{field}.n_bins must be an integer in [1, {MAX_STORED_BINS}]", field=f"{field}.n_bins"
        )
    groups = [group for group in _RELIABILITY_GROUPS if reliability.get(group) is not None]
    if not groups:
        raise InvalidInput(f"{field} needs the bins 'before' or 'after' calibration", field=field)
    tolerance = 1e-9
    for group in groups:
        where = f"{field}.{group}"
        bins = reliability[group]
        if not isinstance(bins, Mapping):
            raise InvalidInput(f"{where} must be an object of counts, mean_confidence, accuracy", field=where)
        columns = {key: bins.get(key) for key in ("counts", "mean_confidence", "accuracy")}
        for key, values in columns.items():
            if not isinstance(values, list) or len(values) != n_bins:
                raise InvalidInput(f"{where}.{key} must be a list of {n_bins} values", field=f"{where}.{key}")
        counts = columns["counts"]
        if not all(_is_int(count) and count >= 0 for count in counts) or not sum(counts):
            raise InvalidInput(f"{where}.counts must be sample counts, not all 0", field=f"{where}.counts")
        if _is_int(n) and sum(counts) != n:
            raise InvalidInput(
                f"{where}.counts sum to {sum(counts)}, not the fit's n = {n}", field=f"{where}.counts"
            )
        for i, count in enumerate(counts):
            low, high = i / n_bins - tolerance, (i + 1) / n_bins + tolerance
            for key, (lo, hi) in (("mean_confidence", (low, high)), ("accuracy", (0.0, 1.0))):
                value = columns[key][i]
                if count == 0 and value is None:
                    continue
                if count == 0 or not _is_number(value) or not lo <= value <= hi:
                    expected = (
                        "null (an empty bin)" if count == 0 else f"a number in [{max(lo, 0):.6g}, {hi:.6g}]"
                    )
                    raise InvalidInput(f"{where}.{key}[{i}] must be {expected}", field=f"{where}.{key}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def stored_reliability(document: Mapping[str, Any]) -> dict | None:
    """The reliability bins a calibrator document stores of its fit data (``fit.reliability``), in the shape of
    an evaluation report's (``n``, ``conventions``, ``reliability`` per group with ``edges``, and each group's
    ``ece``, of the bins): what :func:`service.plots.reliability_diagram` draws. None where the document stores
    none (fitted before the bins were stored, or a document made elsewhere without them)."""
    fit = document.get("fit")
    stored = fit.get("reliability") if isinstance(fit, Mapping) else None
    if not isinstance(stored, Mapping):
        return None
    n_bins = stored["n_bins"]
    edges = [i / n_bins for i in range(n_bins + 1)]
    report: dict[str, Any] = {
        "conventions": {"kind": "top_label", "binning": "width", "n_bins": n_bins},
        "reliability": {},
    }
    for group, name in _RELIABILITY_GROUPS.items():
        bins = stored.get(group)
        if not bins:
            continue
        counts = bins["counts"]
        n = sum(counts)
        gaps = zip(counts, bins["mean_confidence"], bins["accuracy"], strict=True)
        ece = sum(count * abs(confidence - accuracy) for count, confidence, accuracy in gaps if count) / n
        report["n"] = n
        report[name] = {"ece": ece}
        report["reliability"][name] = {
            **bins,
            "edges": edges,
            "ece": ece,
            "n_bins": n_bins,
            "binning": "width",
        }
    return report


# Rows of the fit data whose calibrated confidences make the histogram live traffic is compared with.
_HISTOGRAM_ROWS = 100_000


def fit_confidence_histogram(calibrator: Any, logits: np.ndarray, segments: Any = None) -> list[int]:
    """Counts of the calibrated top-label confidence of the fit data in
    :data:`~service.core.monitoring.CONFIDENCE_BINS` bins (of an even subsample beyond 100k rows): the
    reference of the monitoring's confidence shift (PSI, KS)."""
    step = max(1, -(-logits.shape[0] // _HISTOGRAM_ROWS))
    if segments is not None:  # a segment calibrator: each row with its own segment's temperature
        keys = list(segments.tolist() if isinstance(segments, np.ndarray) else segments)[::step]
        probabilities = calibrator.transform_segments(logits[::step], keys, validate=False)[0]
    else:
        probabilities = calibrator.transform(logits[::step], validate=False)
    return confidence_histogram(probabilities.max(axis=1)).tolist()


def fit_time_figures(
    calibrator: Any,
    logits: np.ndarray,
    labels: np.ndarray,
    before: dict | None = None,
    *,
    segments: Any = None,
    reliability: bool = False,
) -> tuple[dict, dict]:
    """``(before, after)``: :func:`service.core.metrics.fit_figures` of validated logits (unless given)
    and of the fitted ``calibrator``'s answer, with the exact NLL of :func:`evaluate` (infinite where a
    calibrated true class has probability 0: null in the stored document, the rows in ``nll_infinite_rows``).
    ``reliability=True``: with their bins (under ``reliability``; a given ``before`` must have them).

    Temperature scaling's ``after`` comes from a pass over the logits (the same pass as ``before``, when
    that is not given): its softmax of ``z / T`` is never written out. Other methods' from ``transform``.
    """
    if isinstance(calibrator, TemperatureScaling):
        groups = [(calibrator.temperature_, None)]  # from the logits: exact and finite
        if before is None:
            before, after = metrics.fit_figures(
                logits, labels, groups=[(1.0, None), *groups], reliability=reliability
            )
        else:
            (after,) = metrics.fit_figures(logits, labels, groups=groups, reliability=reliability)
        return before, after
    if before is None:
        (before,) = metrics.fit_figures(logits, labels, reliability=reliability)
    if segments is not None:  # a segment calibrator's answer for the fit rows with their segments
        probabilities = calibrator.transform_segments(logits, segments, validate=False)[0]
    else:
        probabilities = calibrator.transform(logits, validate=False)
    after = metrics.fit_figures_of_probabilities(probabilities, labels, reliability=reliability)
    return before, after


def _hash_and_figures(logits: np.ndarray, labels: np.ndarray) -> tuple[str, dict]:
    """What a fit document needs of the data alone: its SHA-256 and its ``before`` figures (with bins)."""
    (before,) = metrics.fit_figures(logits, labels, reliability=True)
    return data_sha256(logits, labels), before


def calibrated_logits(calibrator: Any, logits: np.ndarray) -> np.ndarray:
    """Log of the calibrated probabilities, floored at 1e-300: a logit matrix whose softmax is the
    calibrated answer (the fit-time figures' floored NLL; evaluations use :func:`calibrated_scores`)."""
    with np.errstate(divide="ignore"):
        return np.log(np.clip(calibrator.transform(logits), _PROBABILITY_FLOOR, None))


def calibrated_scores(calibrator: Any, logits: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(scores, from_logits)`` of the calibrated answer, for figures with an exact NLL.

    Temperature scaling: ``log_softmax(z / T)``, logits whose softmax is the answer and whose NLL stays exact
    (finite) where a calibrated probability underflows to 0. Other methods: their probabilities, whose NLL
    is infinite where the true class gets probability 0 (histogram binning can do that on purpose).
    """
    if isinstance(calibrator, TemperatureScaling):
        scaled = log_softmax(logits, calibrator.temperature_)
        if np.all(np.abs(scaled) <= MAX_ABS_LOGIT):  # z / T beyond the logit domain: use the answer
            return scaled, True
    return calibrator.transform(logits), False


def load_calibrator(document: Mapping[str, Any]) -> Any:
    """Rebuild a calibrator from its document, checking the envelope (and ``fit.reliability``, where the
    document has one: :func:`check_fit_reliability`) first."""
    if not isinstance(document, Mapping):
        raise InvalidInput("a calibrator document must be a JSON object", field="document")
    version = document.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InvalidInput(f"unsupported calibrator format_version {version!r}", field="format_version")
    fit = document.get("fit")
    if isinstance(fit, Mapping) and "reliability" in fit:
        check_fit_reliability(fit["reliability"], fit.get("n"))
    return calibrator_from_dict(dict(document))


def calibrate(calibrator: Any | None, scores: Any, *, from_logits: bool = True) -> np.ndarray:
    """Calibrated probabilities; without a calibrator, the plain softmax (identity calibration)."""
    logits = scores_to_logits(scores, from_logits=from_logits, transform=True)
    if calibrator is None:
        return softmax(logits)
    return calibrator.transform(logits)


# ---------------------------------------------------------------------------------------------- conformal

DEFAULT_CONFORMAL_FRACTION = 0.5
"""Share of a fit's rows held out for the conformal threshold when a fit asks for prediction sets: the
calibrator is fitted on the rest. Fitting both on the same rows breaks the exchangeability the coverage
guarantee rests on (the calibrator has seen the threshold's rows: in-sample probabilities are sharper on them
than on new data, so the threshold and the set sizes it gives are off); half and half keeps both estimates
precise on a few thousand rows. ``conformal_fraction: 0`` fits both on every row (no guarantee)."""


def conformal_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(calibrator rows, conformal rows)``, stratified by label and deterministic given ``seed``: each
    class gives ``round(fraction * n_k)`` of its rows (a seeded permutation) to the conformal part."""
    y = np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    conformal: list[np.ndarray] = []
    for k in np.unique(y):
        rows = order[y[order] == k]
        conformal.append(rows[: round(fraction * len(rows))])
    held = np.sort(np.concatenate(conformal)) if conformal else np.array([], dtype=np.int64)
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), held


def check_conformal_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction < 1.0:
        raise InvalidParameter(
            f"conformal_fraction must be a number in [0, 1) (the share of rows held out for the conformal "
            f"threshold; 0: the calibrator's own rows), got {fraction!r}",
            field="conformal_fraction",
        )
    return float(fraction)


def fit_conformal_document(
    scores: Any,
    labels: Any,
    *,
    conformal: Mapping[str, Any],
    conformal_fraction: float | None = None,
    from_logits: bool = True,
    sample_weight: Any = None,
    segments: Any = None,
    **fit_options: Any,
) -> dict:
    """:func:`fit_document` with split-conformal prediction sets in the same calibrator version.

    ``conformal``: ``score`` (``lac``, ``aps``, ``raps``), ``alpha``, ``mondrian``, ``randomized``, ``k_reg``
    and ``lambda`` (raps), ``seed`` (of the split and of randomised scores; default 0). The rows are split
    (:func:`conformal_split`, ``conformal_fraction`` of them, :data:`DEFAULT_CONFORMAL_FRACTION` by default)
    into the calibrator's rows, on which the calibrator and its ``fit`` figures are computed, and the
    conformal rows, whose calibrated probabilities (of this very calibrator) give the threshold
    (:func:`service.core.conformal.fit_thresholds`). The document's ``conformal`` block holds the options,
    the threshold(s), the rows used and the rule (``quantile``). ``sample_weight`` weighs the calibrator's
    fit only: the threshold is the unweighted quantile (weighted conformal prediction answers another
    question, coverage under a known covariate shift).
    """
    spec = conformal_core.conformal_spec(conformal, allowed=("seed",))
    seed = conformal.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameter(
            f"conformal.seed must be an integer >= 0, got {seed!r}", field="conformal.seed"
        )
    fraction = check_conformal_fraction(
        DEFAULT_CONFORMAL_FRACTION if conformal_fraction is None else conformal_fraction
    )
    logits = scores if from_logits else scores_to_logits(scores, from_logits=False)
    logits, y, weight = check_labelled(logits, labels, from_logits=True, sample_weight=sample_weight)
    if fraction > 0.0:
        fit_rows, conformal_rows = conformal_split(y, fraction, seed)
        if len(fit_rows) == 0 or len(conformal_rows) == 0:
            raise InvalidParameter(
                f"conformal_fraction={fraction:g} of {len(y)} rows leaves no rows for "
                f"{'the calibrator' if len(fit_rows) == 0 else 'the conformal threshold'}",
                field="conformal_fraction",
            )
    else:
        fit_rows = conformal_rows = np.arange(len(y))
    segment_list = None if segments is None else np.asarray(segments, dtype=object)
    if segment_list is not None and len(segment_list) != len(y):
        check_segments(segments, len(y))  # its own message
    document = fit_document(
        logits[fit_rows],
        y[fit_rows],
        from_logits=True,
        sample_weight=None if weight is None else weight[fit_rows],
        segments=None if segment_list is None else segment_list[fit_rows].tolist(),
        **fit_options,
    )
    calibrator = load_calibrator(document)
    held = logits[conformal_rows]
    if segment_list is not None and hasattr(calibrator, "transform_segments"):
        probabilities, _ = calibrator.transform_segments(held, segment_list[conformal_rows].tolist())
    else:
        probabilities = calibrator.transform(held)
    fitted = conformal_core.fit_thresholds(
        probabilities, y[conformal_rows], spec, rng=np.random.default_rng([seed, 1])
    )
    document["conformal"] = {
        **fitted.to_dict(),
        "fraction": fraction,
        "seed": seed,
        "split": (
            "stratified by label: each class gives round(fraction * n_class) of its rows (a permutation "
            "seeded by seed) to the threshold, the rest to the calibrator"
            if fraction > 0.0
            else "none: the calibrator and the threshold were fitted on the same rows (no coverage guarantee)"
        ),
    }
    return document


def load_conformal(document: Mapping[str, Any] | None) -> conformal_core.ConformalThresholds | None:
    """The conformal thresholds of a calibrator document (None when it has none); InvalidParameter for a
    malformed ``conformal`` block."""
    if not isinstance(document, Mapping) or document.get("conformal") is None:
        return None
    block = document["conformal"]
    if not isinstance(block, Mapping):
        raise InvalidParameter("conformal must be an object", field="conformal")
    num_classes = document.get("num_classes")
    n_classes = 2 if num_classes in (1, 2) else num_classes
    if not isinstance(n_classes, int) or isinstance(n_classes, bool):
        raise InvalidParameter("a document with conformal sets needs num_classes", field="num_classes")
    return conformal_core.ConformalThresholds.from_dict(block, n_classes)


def conformal_sets(
    fitted: conformal_core.ConformalThresholds, probabilities: np.ndarray, seed: int | None = None
) -> np.ndarray:
    """The ``(N, K)`` boolean prediction sets of calibrated ``probabilities``. Randomised sets draw their
    uniforms from ``seed`` (reproducible) or, without one, from fresh entropy."""
    rng = np.random.default_rng(seed) if fitted.spec.randomized else None
    return conformal_core.prediction_sets(probabilities, fitted, rng=rng)


def conformal_report(
    fitted: conformal_core.ConformalThresholds, probabilities: np.ndarray, labels: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """Coverage and set-size figures (:func:`service.core.conformal.coverage_figures`) of a version's sets on
    labelled rows, with the options that made them."""
    sets = conformal_sets(fitted, probabilities, seed)
    figures_of_sets = conformal_core.coverage_figures(sets, labels, fitted.spec.alpha)
    return {
        **figures_of_sets,
        "score": fitted.spec.score,
        "mondrian": fitted.spec.mondrian,
        "randomized": fitted.spec.randomized,
    }


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate(
    scores: Any,
    labels: Any,
    *,
    from_logits: bool = True,
    calibrator: Any | None = None,
    calibrator_document: Mapping[str, Any] | None = None,
    n_bins: int = 15,
    binning: str = "width",
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    nll_clip: float | None = None,
    ece_convention: str | None = None,
    per_class_tests: bool = False,
    segments: Any = None,
    min_segment_size: int = DEFAULT_MIN_SEGMENT_SIZE,
    progress: Callable[[int, int], None] | None = None,
    conformal: Mapping[str, Any] | None = None,
    conformal_fraction: float | None = None,
) -> dict:
    """Figures before and (with a calibrator) after calibration, reliability bins and optional intervals.

    The answer is the evaluation report (``kind = "calibserve.evaluation"``): its figures sit under
    ``uncalibrated`` and ``calibrated`` by their short names, with the ``conventions`` that produced them.
    ``drift`` (:func:`drift_against_fit`) is added exactly when ``calibrator_document`` has fit-time figures
    (:func:`has_fit_figures`): the one rule for every entry point (HTTP, CLI).

    Figures are those of the scores as given (probabilities are scored as probabilities, never through
    logits) and of the calibrated answer (:func:`calibrated_scores`): NLL is exact, infinite where a true
    class has probability 0 (JSON null, the rows in ``nll_infinite_rows``); ``nll_clip=eps`` asks for the
    clipped NLL instead (``conventions.nll`` says which).

    Options beyond the figures: ``bootstrap`` resamples give ``intervals`` (bias-corrected for ECE and MCE,
    :data:`INTERVALS`); ``ece_convention`` adds ``ece_<convention>`` (a peer library's ECE,
    :mod:`service.core.ece_conventions`); ``per_class_tests`` adds ``per_class_tests`` (the statistical
    tests of each class); ``segments`` (one string or integer key per row) adds ``segments``: every figure
    per segment, intervals for segments of at least ``min_segment_size`` rows, and the worst such segment
    of each figure (:func:`_segment_reports`). ``reliability_smooth`` (smECE's kernel estimate of the
    reliability curve) is always there beside the binned ``reliability``.

    ``conformal`` adds the coverage and set-size figures of prediction sets (:func:`conformal_report`):
    those the calibrator version stores (``calibrator_document["conformal"]``, ``source: "version"``), or,
    when ``conformal`` (the fit's options) asks, sets fitted here: ``conformal_fraction`` (default
    :data:`DEFAULT_CONFORMAL_FRACTION`) of these rows give the threshold on the calibrated (else the given)
    probabilities and the figures are those of the other rows (``source: "asked"``).
    """
    asked = None
    if conformal is not None:
        asked = conformal_core.conformal_spec(conformal, allowed=("seed",))
        conformal_fraction = check_conformal_fraction(
            DEFAULT_CONFORMAL_FRACTION if conformal_fraction is None else conformal_fraction
        )
        if conformal_fraction == 0.0:
            raise InvalidParameter(
                "conformal_fraction must be above 0 in an evaluation: the threshold's rows are held out of "
                "the figures",
                field="conformal_fraction",
            )
    elif conformal_fraction is not None:
        raise InvalidParameter("conformal_fraction goes with conformal", field="conformal_fraction")
    if from_logits:
        logits = scores_to_logits(scores, from_logits=True)
        given: np.ndarray = logits
    else:
        given = check_probabilities(scores)
        logits = probability_logits(given)
    logits, y, _ = check_labelled(logits, labels, from_logits=True)
    if nll_clip is not None:
        nll_clip = metrics.check_nll_clip(nll_clip)
    ece_convention = metrics.check_ece_convention(ece_convention)
    segment_codes = None
    if segments is not None:
        segment_codes, segment_names = check_segments(segments, logits.shape[0])
        if (
            isinstance(min_segment_size, bool)
            or not isinstance(min_segment_size, int)
            or min_segment_size < 1
        ):
            raise InvalidInput(
                f"min_segment_size must be a positive integer, got {min_segment_size!r}",
                field="min_segment_size",
            )
    # the option limits, before any figure is computed
    metrics.check_binning(n_bins, binning, logits.shape[1])
    if bootstrap:
        metrics.check_bootstrap(bootstrap, logits.shape[0])
    groups: dict[str, tuple[np.ndarray, bool]] = {"uncalibrated": (given, from_logits)}
    if calibrator is None and calibrator_document is not None:
        calibrator = load_calibrator(calibrator_document)
    if calibrator is not None:
        groups["calibrated"] = calibrated_scores(calibrator, logits)
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": REPORT_KIND,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": int(logits.shape[0]),
        "num_classes": int(logits.shape[1]),
        "calibrator": _calibrator_summary(calibrator_document, calibrator),
    }
    for group, (values, values_are_logits) in groups.items():
        report[group] = figures(
            values,
            y,
            from_logits=values_are_logits,
            n_bins=n_bins,
            binning=binning,
            nll_clip=nll_clip,
            ece_convention=ece_convention,
        )
    report["conventions"] = report["uncalibrated"].pop("conventions", {})
    for group in groups:
        report[group].pop("conventions", None)
    report["reliability"] = {
        group: metrics.reliability_bins(
            values, y, from_logits=values_are_logits, n_bins=n_bins, binning=binning
        ).to_dict()
        for group, (values, values_are_logits) in groups.items()
    }
    if per_class_tests:
        # on request: K tests a figure (each class's p_k against 1[y = k]), a list per figure
        report["per_class_tests"] = {
            group: metrics.per_class_calibration_tests(values, y, from_logits=values_are_logits)
            for group, (values, values_are_logits) in groups.items()
        }
    # the binning-free diagram beside the binned one (smECE's kernel estimate, at its bandwidth)
    report["reliability_smooth"] = {
        group: metrics.smooth_reliability(values, y, from_logits=values_are_logits).to_dict()
        for group, (values, values_are_logits) in groups.items()
    }
    if bootstrap:
        binned = {"n_bins": n_bins, "binning": binning}
        report["intervals"] = {
            group: _intervals(
                values, y, values_are_logits, bootstrap, seed, confidence, binned, nll_clip, progress
            )
            for group, (values, values_are_logits) in groups.items()
        }
        report["conventions"]["bootstrap"] = {
            "n_resamples": bootstrap,
            "confidence": confidence,
            "seed": seed,
            # ECE-like figures are biased upwards, so their percentile intervals sit too high: bias-corrected
            "interval": {name: metrics.default_interval_method(function) for name, function in INTERVALS},
            "methods": dict(metrics.INTERVAL_CONVENTIONS),
        }
    if segment_codes is not None:
        report["segments"] = _segment_reports(
            groups,
            y,
            segment_codes,
            segment_names,
            min_segment_size=min_segment_size,
            options={
                "n_bins": n_bins,
                "binning": binning,
                "nll_clip": nll_clip,
                "ece_convention": ece_convention,
            },
            bootstrap=(bootstrap, seed, confidence),
        )
    fitted_sets = load_conformal(calibrator_document)
    if asked is not None or (fitted_sets is not None and calibrator is not None):
        # prediction sets on these rows: coverage (marginal, per class, per set size), set sizes
        if calibrator is None:
            calibrated = given if not from_logits else softmax(logits)
        elif segments is not None and hasattr(calibrator, "transform_segments"):
            calibrated, _ = calibrator.transform_segments(logits, segments)
        else:
            calibrated = calibrator.transform(logits)
        if asked is None:
            report["conformal"] = {**conformal_report(fitted_sets, calibrated, y, seed), "source": "version"}
        else:
            split_seed = conformal.get("seed", 0)
            rest, held = conformal_split(y, conformal_fraction, split_seed)
            if len(rest) == 0 or len(held) == 0:
                raise InvalidParameter(
                    f"conformal_fraction={conformal_fraction:g} of {len(y)} rows leaves no rows for "
                    f"{'the figures' if len(rest) == 0 else 'the threshold'}",
                    field="conformal_fraction",
                )
            here = conformal_core.fit_thresholds(
                calibrated[held], y[held], asked, rng=np.random.default_rng([split_seed, 1])
            )
            report["conformal"] = {
                **conformal_report(here, calibrated[rest], y[rest], seed),
                "source": "asked",
                "n_threshold": len(held),
                "threshold": here.threshold,
                "thresholds": list(here.thresholds) if here.thresholds is not None else None,
            }
    report["thresholds"] = []
    report["summary"] = summarise([])
    if calibrator_document is not None and has_fit_figures(calibrator_document):
        report["drift"] = drift_against_fit(report, calibrator_document)
    return report


# Figures for which a smaller value is the worse one (a p-value, accuracy); signed figures whose ideal is a
# value (a calibration intercept of 0, a slope of 1, Spiegelhalter's z of 0), for which the worse is the one
# further from it, either way; for every other figure of a segment report (calibration errors, losses, test
# statistics' sizes) the larger is worse.
_LOWER_IS_WORSE = ("accuracy",)
_IDEAL_VALUES = {"calibration_intercept": 0.0, "calibration_slope": 1.0, "spiegelhalter_z": 0.0}


def _worse_is_lower(name: str) -> bool:
    return name in _LOWER_IS_WORSE or name.endswith("_p") or "_p_" in name


def _badness(name: str, value: float) -> float:
    """How bad a figure's value is, larger worse, so that the worst segment is the maximum."""
    ideal = next((target for prefix, target in _IDEAL_VALUES.items() if name.startswith(prefix)), None)
    if ideal is not None and not name.endswith("_p") and "_p_" not in name and not name.endswith("_se"):
        return abs(value - ideal)
    return -value if _worse_is_lower(name) else value


def _segment_reports(
    groups: Mapping[str, tuple[np.ndarray, bool]],
    labels: np.ndarray,
    codes: np.ndarray,
    names: list[str],
    *,
    min_segment_size: int,
    options: Mapping[str, Any],
    bootstrap: tuple[int, int, float],
) -> dict:
    """Every figure per segment (and its bootstrap intervals, for segments of at least
    ``min_segment_size`` rows), and the worst gated segment of each figure.

    A segment smaller than the floor is reported (``gated: false``) but neither gets intervals nor takes
    part in ``worst``: its figures are too noisy to fail a build on. A segment whose figures cannot be
    computed (one row, say) says why in ``error``.
    """
    n_resamples, seed, confidence = bootstrap
    by_segment: dict[str, dict] = {}
    for code, name in enumerate(names):
        rows = np.flatnonzero(codes == code)
        entry: dict[str, Any] = {"n": int(rows.size), "gated": bool(rows.size >= min_segment_size)}
        try:
            for group, (values, values_are_logits) in groups.items():
                figures_of_group = figures(
                    values[rows], labels[rows], from_logits=values_are_logits, **options
                )
                figures_of_group.pop("conventions", None)
                entry[group] = figures_of_group
            # the segment's reliability bins: the HTML report draws one small diagram per segment
            entry["reliability"] = {
                group: metrics.reliability_bins(
                    values[rows],
                    labels[rows],
                    from_logits=values_are_logits,
                    n_bins=options["n_bins"],
                    binning=options["binning"],
                ).to_dict()
                for group, (values, values_are_logits) in groups.items()
            }
            if n_resamples and entry["gated"]:
                binned = {"n_bins": options["n_bins"], "binning": options["binning"]}
                entry["intervals"] = {
                    group: _intervals(
                        values[rows],
                        labels[rows],
                        values_are_logits,
                        n_resamples,
                        seed,
                        confidence,
                        binned,
                        options["nll_clip"],
                        None,
                    )
                    for group, (values, values_are_logits) in groups.items()
                }
        except InvalidInput as exc:
            entry = {"n": int(rows.size), "gated": False, "error": str(exc)}
        by_segment[name] = entry
    worst: dict[str, dict[str, dict]] = {}
    for group in groups:
        candidates: dict[str, dict] = {}
        for name, entry in by_segment.items():
            if not entry["gated"] or group not in entry:
                continue
            for figure, value in entry[group].items():
                if figure == "n" or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                best = candidates.get(figure)
                if best is None or _badness(figure, value) > _badness(figure, best["value"]):
                    candidates[figure] = {"segment": name, "value": value, "n": entry["n"]}
        worst[group] = candidates
    return {
        "n_segments": len(names),
        "min_segment_size": min_segment_size,
        "gated": sum(entry["gated"] for entry in by_segment.values()),
        "by_segment": by_segment,
        "worst": worst,
        "worst_rule": "over segments of at least min_segment_size rows: the largest value of each figure, "
        "the smallest of accuracy and p-values, and the furthest from its ideal of calibration_intercept (0), "
        "calibration_slope (1) and spiegelhalter_z (0)",
    }


def _calibrator_summary(document: Mapping[str, Any] | None, calibrator: Any | None) -> dict | None:
    if document is None and calibrator is None:
        return None
    source = dict(document) if document is not None else calibrator.to_dict()
    summary = {key: source.get(key) for key in ("model", "version", "method", "temperature") if key in source}
    summary.setdefault("method", source.get("method"))
    return summary


INTERVALS = (
    ("ece", metrics.expected_calibration_error),
    ("mce", metrics.maximum_calibration_error),
    ("brier", metrics.brier_score),
    ("nll", metrics.negative_log_likelihood),
    ("accuracy", metrics.accuracy),
)
"""The figures a bootstrap gives intervals of, with their functions (whose default interval method,
:func:`service.core.metrics.default_interval_method`, is the report's: bias-corrected (``basic``) for
``ece`` and ``mce``)."""


def _intervals(scores, y, from_logits, n_resamples, seed, confidence, binned, nll_clip, progress) -> dict:
    options = {"ece": binned, "mce": binned, "nll": {"clip": nll_clip}}
    functions = {name: (function, options.get(name, {})) for name, function in INTERVALS}
    out = {}
    for index, (name, (function, options)) in enumerate(functions.items()):
        low, high = metrics.bootstrap_interval(
            function,
            scores,
            y,
            from_logits=from_logits,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
            **options,
        )
        out[name] = [float(low), float(high)]
        if progress is not None:
            progress(index + 1, len(functions))
    return out


# ------------------------------------------------------------------------------------- thresholds, drift

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_THRESHOLD = re.compile(
    r"^\s*(?:(uncalibrated|calibrated)\.)?(?:(worst)\.)?([a-z_0-9]+)(?:\.(upper|lower))?"
    r"\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$"
)
BOUNDS = {"lower": 0, "upper": 1}
"""``--fail-on`` bounds of a figure's bootstrap interval (``ece.upper>0.03``): index in ``[low, high]``."""


@dataclass(frozen=True)
class Threshold:
    """A failure condition such as ``ece>0.03``: breached when the figure satisfies the comparison.

    ``bound`` (``ece.upper>0.03``, ``calibrated.ece.lower>0.01``) compares a bound of the figure's bootstrap
    interval instead (the report's ``intervals``, from ``--bootstrap N``): ``ece.lower>0.03`` fails only
    when the calibration error is above 0.03 beyond the bootstrap's doubt, ``ece.upper>0.03`` unless it is
    below it beyond that doubt. A p-value figure (``spiegelhalter_p<0.01``) gates on a test of calibration.
    """

    expression: str
    group: str | None
    metric: str
    op: str
    limit: float
    bound: str | None = None
    worst: bool = False

    @classmethod
    def parse(cls, expression: str) -> Threshold:
        match = _THRESHOLD.match(expression)
        if match is None:
            raise InvalidInput(
                f"threshold {expression!r} must look like 'ece>0.03', 'calibrated.brier>=0.2', "
                "'ece.upper>0.03' (a bound of the bootstrap interval) or 'spiegelhalter_p<0.01'",
                field="fail_on",
            )
        group, worst, metric, bound, op, limit = match.groups()
        if worst and metric == "worst":
            raise InvalidInput(f"threshold {expression!r} names no figure after worst.", field="fail_on")
        try:
            value = float(limit)
        except ValueError:
            raise InvalidInput(
                f"threshold {expression!r} has no number after {op}", field="fail_on"
            ) from None
        return cls(expression.strip(), group, metric, op, value, bound, worst is not None)


def check_thresholds(report: dict, expressions: Iterable[str]) -> list[dict]:
    """Evaluate each ``--fail-on`` expression on the report (calibrated figures when present)."""
    results = []
    for expression in expressions:
        threshold = Threshold.parse(expression)
        group = threshold.group or ("calibrated" if report.get("calibrated") else "uncalibrated")
        figures_of_group = report.get(group)
        if not figures_of_group:
            raise InvalidInput(f"threshold {expression!r} names {group} figures, which this report has not")
        if threshold.worst:
            results.append(_worst_check(report, group, threshold))
            continue
        if threshold.metric not in figures_of_group:
            known = ", ".join(sorted(k for k, v in figures_of_group.items() if isinstance(v, int | float)))
            raise InvalidInput(
                f"threshold {expression!r}: unknown figure {threshold.metric!r} (known: {known})"
            )
        check: dict[str, Any] = {
            "name": threshold.expression,
            "kind": "fail_on",
            "group": group,
            "metric": threshold.metric,
            "op": threshold.op,
            "limit": threshold.limit,
        }
        if threshold.bound is None:
            value = _figure_value(figures_of_group, threshold.metric)
        else:
            value = _interval_bound(report, group, threshold)
            check |= {"bound": threshold.bound, "estimate": _figure_value(figures_of_group, threshold.metric)}
            method = ((report.get("conventions") or {}).get("bootstrap") or {}).get("interval") or {}
            check["interval"] = method.get(threshold.metric)
        if threshold.metric in P_VALUES and threshold.bound is None:
            # a p-value gate: the check names its test and carries the test's statistic
            test, statistic = P_VALUES[threshold.metric]
            check |= {
                "test": test,
                "statistic": statistic,
                "statistic_value": figures_of_group.get(statistic),
            }
        breached = _OPERATORS[threshold.op](value, threshold.limit)
        results.append({**check, "value": value, "status": "fail" if breached else "pass"})
    return results


def _worst_check(report: Mapping[str, Any], group: str, threshold: Threshold) -> dict:
    """A ``worst.<figure>`` threshold: the figure (or a bound of its interval) of the worst segment of at
    least the report's ``min_segment_size`` rows. ``unknown`` when no segment is that large."""
    segments = report.get("segments")
    if not segments:
        raise InvalidInput(
            f"threshold {threshold.expression!r} reads the worst segment, and this report has no segments: "
            "give --segments FILE (HTTP 'segments': [...])",
            field="fail_on",
        )
    below = threshold.op in ("<", "<=")
    chosen: tuple[float, str, int] | None = None
    for name, entry in segments["by_segment"].items():
        if not entry.get("gated") or group not in entry:
            continue
        if threshold.bound is None:
            if threshold.metric not in entry[group]:
                continue
            value = _figure_value(entry[group], threshold.metric)
        else:
            bounds = ((entry.get("intervals") or {}).get(group) or {}).get(threshold.metric)
            if bounds is None:
                raise InvalidInput(
                    f"threshold {threshold.expression!r} reads bootstrap intervals of the segments: give "
                    "--bootstrap N (and the figure must have intervals: ece, mce, brier, nll, accuracy)",
                    field="fail_on",
                )
            value = (
                float("nan")
                if bounds[BOUNDS[threshold.bound]] is None
                else float(bounds[BOUNDS[threshold.bound]])
            )
        # the segment nearest to breaching the gate: the smallest value for "<", the largest for ">"
        if chosen is None or (value < chosen[0] if below else value > chosen[0]):
            chosen = (value, name, entry["n"])
    check: dict[str, Any] = {
        "name": threshold.expression,
        "kind": "fail_on",
        "group": group,
        "metric": threshold.metric,
        "op": threshold.op,
        "limit": threshold.limit,
        "worst": True,
        "min_segment_size": segments.get("min_segment_size"),
    }
    if threshold.bound is not None:
        check["bound"] = threshold.bound
    if chosen is None:
        detail = f"no segment of at least {segments.get('min_segment_size')} rows has {threshold.metric}"
        return {**check, "value": None, "status": "unknown", "detail": detail}
    value, name, n = chosen
    breached = _OPERATORS[threshold.op](value, threshold.limit)
    return {
        **check,
        "value": value,
        "segment": name,
        "segment_n": n,
        "status": "fail" if breached else "pass",
    }


def _interval_bound(report: Mapping[str, Any], group: str, threshold: Threshold) -> float:
    """The ``lower`` or ``upper`` bound of a figure's bootstrap interval; InvalidInput when the report has
    no interval of it (no ``--bootstrap N``, or a figure without intervals)."""
    intervals = (report.get("intervals") or {}).get(group)
    if not intervals:
        raise InvalidInput(
            f"threshold {threshold.expression!r} reads the bootstrap interval of {threshold.metric}, and this "
            "report has none: give --bootstrap N (HTTP 'bootstrap': N)",
            field="fail_on",
        )
    if threshold.metric not in intervals:
        raise InvalidInput(
            f"threshold {threshold.expression!r}: {threshold.metric} has no bootstrap interval (intervals: "
            f"{', '.join(intervals)})",
            field="fail_on",
        )
    value = intervals[threshold.metric][BOUNDS[threshold.bound]]
    return float("nan") if value is None else float(value)


def _figure_value(figures_of_group: Mapping[str, Any], name: str) -> float:
    """A figure as a float: an infinite one came through JSON as null, with its rows named beside it
    (``nll_infinite_rows``), and counts as infinite; any other null is NaN (no comparison holds)."""
    value = figures_of_group[name]
    if value is None:
        return float("inf") if figures_of_group.get(f"{name}_infinite_rows") else float("nan")
    return float(value)


def parse_max_increase(spec: str | Mapping[str, float]) -> dict[str, float]:
    """``"ece=0.01,nll=0.05"`` (or a mapping) -> ``{"ece": 0.01, "nll": 0.05}``."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise InvalidInput(f"max increase {part!r} must look like 'ece=0.01'", field="max_increase")
            items.append((name.strip(), value))
    try:
        return {str(name): float(value) for name, value in items}
    except (TypeError, ValueError):
        raise InvalidInput(f"max increase {spec!r} must give numbers", field="max_increase") from None


def check_drift(report: dict, baseline: Mapping[str, Any], max_increase: Mapping[str, float]) -> list[dict]:
    """Compare figures with a baseline (a report, or a calibrator's fit-time figures): one check per figure."""
    results = []
    for metric_name, allowed in max_increase.items():
        group = "calibrated" if report.get("calibrated") and baseline.get("calibrated") else "uncalibrated"
        current = (report.get(group) or {}).get(metric_name)
        reference = (baseline.get(group) or {}).get(metric_name)
        if current is None or reference is None:
            raise InvalidInput(f"figure {metric_name!r} is missing from the report or the baseline ({group})")
        increase = float(current) - float(reference)
        # accuracy drifts downwards: a fall is the breach, and the check says so
        falls = metric_name == "accuracy"
        change = -increase if falls else increase
        direction = "decrease" if falls else "increase"
        results.append(
            {
                "name": f"{metric_name} {direction} <= {allowed:g}",
                "kind": "max_increase",
                "group": group,
                "metric": metric_name,
                "op": f"{direction}>",
                "limit": float(allowed),
                "value": float(current),
                "baseline": float(reference),
                "change": change,
                "status": "fail" if change > allowed else "pass",
            }
        )
    return results


_DRIFT_RULE = re.compile(r"^\s*([a-z_]+)\s*([+-])\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class DriftRule:
    """``ece+0.02``: breached when the figure rose more than 0.02 above its baseline (the calibrator's
    fit-time figure); ``accuracy-0.05``: when it fell more than 0.05 below it."""

    expression: str
    metric: str
    sign: str
    limit: float

    @classmethod
    def parse(cls, expression: str) -> DriftRule:
        match = _DRIFT_RULE.match(expression) if isinstance(expression, str) else None
        if match is None:
            raise InvalidInput(
                f"drift rule {expression!r} must look like 'ece+0.02' (a rise) or 'accuracy-0.05' (a fall)",
                field="fail_on",
            )
        metric, sign, limit = match.groups()
        return cls(expression.strip(), metric, sign, float(limit))

    def check(self, current: float | None, baseline: float | None) -> dict:
        """One check in the report's ``thresholds`` form; ``status`` is ``unknown`` where a figure is missing."""
        check = {
            "name": self.expression,
            "kind": "drift",
            "metric": self.metric,
            "op": "rise>" if self.sign == "+" else "fall>",
            "limit": self.limit,
            "value": current,
            "baseline": baseline,
        }
        if current is None or baseline is None:
            return {**check, "change": None, "status": "unknown"}
        change = (current - baseline) if self.sign == "+" else (baseline - current)
        return {**check, "change": change, "status": "fail" if change > self.limit else "pass"}


def parse_drift_rules(spec: str | Iterable[str]) -> list[DriftRule]:
    """``"ece+0.02,accuracy-0.05"`` (or a list of such) -> rules."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [DriftRule.parse(part) for part in parts if part.strip()]


def summarise(checks: list[dict]) -> dict:
    failed = sum(check["status"] == "fail" for check in checks)
    return {
        "checks": len(checks),
        "passed": len(checks) - failed,
        "failed": failed,
        "status": "fail" if failed else "pass",
    }


def apply_checks(report: dict, checks: list[dict]) -> dict:
    report["thresholds"] = [*report.get("thresholds", []), *checks]
    report["summary"] = summarise(report["thresholds"])
    return report


def fit_time_baseline(document: Mapping[str, Any]) -> dict:
    """The fit-time figures of a calibrator as a baseline report (its 'after' are the calibrated figures)."""
    fit = document.get("fit") or {}
    return {"uncalibrated": fit.get("before") or {}, "calibrated": fit.get("after") or {}}


def has_fit_figures(document: Mapping[str, Any]) -> bool:
    """Whether a calibrator document carries its fit-time figures (``fit.before`` or ``fit.after``)."""
    fit = document.get("fit")
    return isinstance(fit, Mapping) and bool(fit.get("before") or fit.get("after"))


def drift_against_fit(report: dict, document: Mapping[str, Any]) -> dict:
    """Per-figure change of this evaluation against the calibrator's figures at fit time."""
    baseline = fit_time_baseline(document)
    out: dict[str, dict] = {}
    for group in ("uncalibrated", "calibrated"):
        if report.get(group) and baseline.get(group):
            out[group] = {
                name: _figure_value(report[group], name) - _figure_value(baseline[group], name)
                for name in HEADLINE_FIGURES
                if name in report[group] and name in baseline[group]
            }
    return {"baseline": "fit", "calibrator_version": document.get("version"), "change": out}


# ------------------------------------------------------------------------------------ monitoring windows

MONITORING_FIGURES = (*HEADLINE_FIGURES, "mean_confidence", "overconfidence", "underconfidence")


def parse_monitor_rule(expression: str) -> DriftRule | Threshold:
    """A ``calibserve monitor --fail-on`` rule: a drift rule against the calibrator's fit-time figure
    (``ece+0.02``: a rise of more than 0.02; ``accuracy-0.05``: a fall of more than 0.05), or an absolute
    :class:`Threshold` (``ece>0.05``)."""
    if isinstance(expression, str) and _DRIFT_RULE.match(expression):
        return DriftRule.parse(expression)
    if isinstance(expression, str) and _THRESHOLD.match(expression):
        return Threshold.parse(expression)
    raise InvalidInput(
        f"--fail-on {expression!r} must be a drift rule such as 'ece+0.02' (a rise over the fit-time figure) "
        "or 'accuracy-0.05' (a fall), or a threshold such as 'ece>0.05'",
        field="fail_on",
    )


def monitoring_report(
    window: Mapping[str, Any],
    *,
    calibrator_document: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    rules: Iterable[DriftRule | Threshold] | None = None,
    require_outcomes: bool = False,
) -> dict:
    """An evaluation report (``kind = "calibserve.evaluation"``, so that the report writers and a later
    ``--baseline`` read it) of a monitoring window: the answer of ``GET /v1/models/{name}/monitoring``.

    ``calibrated`` holds the window's figures (its outcomes were scored with the calibrator that answered),
    ``reliability.calibrated`` its bins, and ``monitoring`` what only a window has: its length, the number of
    outcomes and the minimum the server judges, the server's drift state and checks, and the label-free
    figures. ``thresholds`` are the ``rules`` (:func:`parse_monitor_rule`): drift rules are checked against
    ``calibrator_document``'s fit-time figures (``fit.after``), thresholds against the window's figures;
    without rules, the server's own drift checks are the thresholds.

    A window with fewer outcomes than the server's minimum (``drift.state`` ``too_few_outcomes``) is not
    judged: every check is ``unknown``, and the run passes, unless ``require_outcomes``, which adds a check
    ``outcomes>=<minimum>`` that fails then (and passes otherwise). Rules that cannot be checked whatever the
    outcomes (an unknown figure, a drift rule without fit-time figures) raise :class:`InvalidInput`.
    """
    figures = dict(window.get("figures") or {})
    n = int(figures.get("n") or 0)
    server_drift = dict(window.get("drift") or {})
    minimum = server_drift.get("min_outcomes")
    judged = n > 0 and server_drift.get("state") != "too_few_outcomes"
    calibrated = {
        name: figures[name]
        for name in MONITORING_FIGURES
        if isinstance(figures.get(name), int | float) and not isinstance(figures.get(name), bool)
    }
    version = window.get("calibrator_version")
    rules = list(rules or [])
    if not rules:
        checks = [{"group": "calibrated", **check} for check in server_drift.get("checks") or []]
    else:
        baseline = (
            _fit_after(calibrator_document, version) if any(isinstance(r, DriftRule) for r in rules) else {}
        )
        checks = [_monitor_check(rule, figures, baseline) for rule in rules]
    if not judged:
        reason = f"not judged: {n} outcomes in the window, fewer than {minimum}"
        checks = [{**check, "status": "unknown", "detail": reason} for check in checks]
    if require_outcomes:
        limit = int(minimum or 1)
        checks.append(
            {
                "name": f"outcomes>={limit}",
                "kind": "outcomes",
                "metric": "n",
                "op": "<",
                "limit": limit,
                "value": n,
                "status": "pass" if judged else "fail",
            }
        )
    failed = sum(check["status"] == "fail" for check in checks)
    unknown = sum(check["status"] == "unknown" for check in checks)
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": REPORT_KIND,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n": n,
        "num_classes": num_classes,
        "model": window.get("model"),
        "calibrator": _calibrator_summary(calibrator_document, None) if calibrator_document else None,
        "calibrated": {**calibrated, "n": n},
        "conventions": {
            "kind": "top_label",
            "binning": "width",
            "n_bins": len(figures.get("bins") or []) or None,
            "norm": "l1",
            "nll": "exact",
            "source": "monitoring window: the labelled outcomes of logged predictions, scored with the "
            "calibrator version that answered them",
        },
        "thresholds": checks,
        "summary": {
            "checks": len(checks),
            "passed": len(checks) - failed - unknown,
            "failed": failed,
            "unknown": unknown,
            "status": "fail" if failed else "pass",
        },
        "monitoring": {
            "window": window.get("window"),
            "window_seconds": window.get("window_seconds"),
            "calibrator_version": version,
            "outcomes": n,
            "min_outcomes": minimum,
            "judged": judged,
            "rules": "fail_on" if rules else "server",
            "drift": server_drift,
            "label_free": dict(window.get("label_free") or {}),
        },
    }
    if n:
        report["reliability"] = {"calibrated": _window_reliability(figures)}
    return report


def _fit_after(document: Mapping[str, Any] | None, version: Any) -> dict:
    """The fit-time figures drift rules compare with: the calibrator's ``fit.after``."""
    if version is None or document is None:
        raise InvalidInput(
            "drift rules compare with the calibrator's fit-time figures, and this window's outcomes were "
            "answered without a calibrator; use thresholds such as 'ece>0.05'",
            field="fail_on",
        )
    fit = document.get("fit")
    after = fit.get("after") if isinstance(fit, Mapping) else None
    if not isinstance(after, Mapping) or not after:
        raise InvalidInput(
            f"calibrator version {version} has no fit-time figures (fit.after) for drift rules to compare "
            "with; use thresholds such as 'ece>0.05'",
            field="fail_on",
        )
    return dict(after)


def _monitor_check(
    rule: DriftRule | Threshold, figures: Mapping[str, Any], baseline: Mapping[str, Any]
) -> dict:
    if rule.metric not in MONITORING_FIGURES or rule.metric not in figures:
        known = ", ".join(name for name in MONITORING_FIGURES if name in figures)
        raise InvalidInput(f"--fail-on {rule.expression!r}: unknown figure {rule.metric!r} (known: {known})")
    value = figures.get(rule.metric)
    current = float(value) if isinstance(value, int | float) else None
    if isinstance(rule, DriftRule):
        reference = baseline.get(rule.metric)
        if not isinstance(reference, int | float):
            known = ", ".join(sorted(k for k, v in baseline.items() if isinstance(v, int | float)))
            raise InvalidInput(
                f"--fail-on {rule.expression!r}: the fit-time figures have no {rule.metric!r} (they have {known})"
            )
        return {**rule.check(current, float(reference)), "group": "calibrated"}
    if rule.group == "uncalibrated":
        raise InvalidInput(
            f"--fail-on {rule.expression!r}: a monitoring window has calibrated figures only", field="fail_on"
        )
    if rule.bound is not None or rule.worst:
        raise InvalidInput(
            f"--fail-on {rule.expression!r}: a monitoring window has no bootstrap intervals or segments",
            field="fail_on",
        )
    check = {
        "name": rule.expression,
        "kind": "fail_on",
        "group": "calibrated",
        "metric": rule.metric,
        "op": rule.op,
        "limit": rule.limit,
        "value": current,
    }
    if current is None:
        return {**check, "status": "unknown"}
    return {**check, "status": "fail" if _OPERATORS[rule.op](current, rule.limit) else "pass"}


def _window_reliability(figures: Mapping[str, Any]) -> dict:
    """A window's bins in the form of :meth:`service.core.metrics.ReliabilityBins.to_dict`."""
    bins = list(figures.get("bins") or [])
    counts = [int(b["count"]) for b in bins]
    total = sum(counts)
    return {
        "edges": [b["lower"] for b in bins] + ([bins[-1]["upper"]] if bins else []),
        "counts": counts,
        "proportions": [count / total if total else 0.0 for count in counts],
        "mean_confidence": [b.get("confidence") for b in bins],
        "accuracy": [b.get("accuracy") for b in bins],
        "ece": figures.get("ece"),
        "mce": figures.get("mce"),
        "overconfidence": figures.get("overconfidence"),
        "underconfidence": figures.get("underconfidence"),
        "n_bins": len(bins),
        "binning": "width",
        "kind": "top_label",
    }
