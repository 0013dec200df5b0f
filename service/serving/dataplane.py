"""The use cases of calibserve, once, for every protocol (as KServe's ``DataPlane`` and MLServer's
``handlers/dataplane.py``): models, calibrators, calibrate, predict, fit-and-store, evaluate, figures, export.

Arguments are numpy arrays, plain values and domain objects; answers are domain objects or plain dicts;
failures are :mod:`service.errors` exceptions. Codecs (v1 HTTP, the Open Inference Protocol, the CLI's
local mode) decode their request, call one method here and encode what it returns; how an error becomes a
status is theirs to say. Blocking work (fits, file writes, large arrays, forward passes) runs in the
worker's thread pool; small calibrations inline, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import multilabel_workflows, workflows
from service.core import losses
from service.core.cancellation import Budget
from service.core.multilabel import check_label_count, check_task
from service.core.probability import softmax
from service.core.validation import n_label_classes, same_class_count
from service.errors import Conflict, InvalidInput, ModelFailed, NotFound, NotReady, StoreUnavailable
from service.lazy import require_module
from service.monitoring_store import MonitoringStore
from service.serving.concurrency import bounded, compute, in_thread, wait_for
from service.serving.monitoring import CalibratorView, Monitoring, PredictionIds, open_store
from service.serving.proxy import PassedThrough, UpstreamAnswer, UpstreamModels
from service.serving.state import ActiveCalibrator, AppState, ModelInfo
from service.serving.telemetry import FITS, MODEL_FAILURES, MonitoringCollector, publish_active
from service.upstream import UpstreamSpec

SCORE_KINDS = ("logits", "probabilities")
# "upstream_inputs": named input arrays of a model served upstream, [(name, array), ...]
LABELLED_KINDS = ("logits", "probabilities", "inputs", "upstream_inputs")


@dataclass(frozen=True, slots=True)
class Prediction:
    """Calibrated probabilities of one request, with what produced them."""

    model: ModelInfo
    probabilities: np.ndarray
    calibrator_version: int | None
    logits: np.ndarray | None = None
    ids: PredictionIds | None = None  # the logged rows' ids, where the prediction log is on
    # a segment_temperature calibrator's answer: the rows that got the global temperature
    segment_fallback: np.ndarray | None = None
    # a venn_abers calibrator's [p0, p1] per row and class, where the request asked for them
    intervals: np.ndarray | None = None
    # a version fitted with conformal sets: each row's set as an (N, K) boolean matrix, and its alpha
    prediction_sets: np.ndarray | None = None
    alpha: float | None = None

    @property
    def multilabel(self) -> bool:
        return self.model.task == "multilabel"

    @property
    def predicted_class(self) -> np.ndarray:
        if self.multilabel:  # a 0/1 matrix: each label whose calibrated probability is at least 1/2
            return (self.probabilities >= 0.5).astype(np.int64)
        return self.probabilities.argmax(axis=1)

    def predicted_labels(self, predicted: np.ndarray | None = None) -> list[str] | None:
        names = self.model.class_names
        if not names:
            return None
        classes = self.predicted_class if predicted is None else predicted
        return [names[k] for k in classes.tolist()]


@dataclass(frozen=True, slots=True)
class UpstreamPrediction:
    """An upstream model's inference answer with the probabilities calibrated from its logits."""

    model: ModelInfo
    answer: UpstreamAnswer
    probabilities: np.ndarray
    calibrator_version: int | None
    ids: PredictionIds | None = None
    prediction_sets: np.ndarray | None = None  # as Prediction's
    alpha: float | None = None

    @property
    def predicted_class(self) -> np.ndarray:
        if self.model.task == "multilabel":  # a 0/1 matrix, as Prediction's
            return (self.probabilities >= 0.5).astype(np.int64)
        return self.probabilities.argmax(axis=1)


@dataclass(frozen=True, slots=True)
class Labelled:
    """A labelled set: scores of one kind (logits, probabilities or model inputs), labels, weights."""

    kind: str
    values: np.ndarray
    labels: Any
    sample_weight: Any = None
    segments: Any = None


@dataclass(frozen=True, slots=True)
class FitSpec:
    method: str = "temperature"
    options: Mapping[str, Any] | None = None
    activate: bool = True
    # split-conformal prediction sets in the same version (workflows.fit_conformal_document)
    conformal: Mapping[str, Any] | None = None
    conformal_fraction: float | None = None


@dataclass(frozen=True, slots=True)
class RefitSpec:
    """A refit from logged outcomes: the window, the method, the held-out fraction, and whether to activate
    (``True``, ``False`` or ``"if_better"``: when the held-out NLL improves on the active calibrator's)."""

    window: str = "24h"
    method: str = "temperature"
    options: Mapping[str, Any] | None = None
    holdout: float = 0.3
    activate: bool | str = False
    seed: int = 0


@dataclass(frozen=True, slots=True)
class EvaluateSpec:
    n_bins: int = 15
    binning: str = "width"
    bootstrap: int = 0
    seed: int = 0
    nll_clip: float | None = None  # None: the exact NLL
    ece_convention: str | None = None  # a peer's ECE convention, reported as ece_<convention>
    per_class_tests: bool = False  # the calibration tests of each class too
    segments: Any = None  # one key per row: figures per segment and the worst one
    min_segment_size: int = 100  # rows a segment needs to be gated
    conformal: Mapping[str, Any] | None = None  # prediction sets fitted on part of the rows (evaluate only)
    conformal_fraction: float | None = None


def check_columns(model: ModelInfo, scores: np.ndarray, field: str) -> None:
    """InvalidInput when ``scores`` has a column count that does not fit the model's classes."""
    expected = model.num_classes
    if expected is not None and scores.ndim == 2 and not same_class_count(scores.shape[1], expected):
        raise InvalidInput(
            f"model {model.name!r} has {expected} classes; {field} has {scores.shape[1]} columns", field=field
        )


def calibrate_array(calibrator: Any | None, scores: Any, *, from_logits: bool) -> np.ndarray:
    """``workflows.calibrate`` validating the scores once (the calibrator's own check is skipped)."""
    logits = workflows.scores_to_logits(scores, from_logits=from_logits, transform=True)
    if calibrator is None:
        return softmax(logits)
    if n_label_classes(logits.shape[1]) != calibrator.num_classes_:
        return calibrator.transform(logits)  # raises the calibrator's own message
    return calibrator.transform(logits, validate=False)


def _segmented(calibrator: Any | None) -> bool:
    return calibrator is not None and hasattr(calibrator, "transform_segments")


def calibrate_segments(
    entry: ActiveCalibrator, scores: Any, segments: Any, *, from_logits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, fallback)`` of a segment_temperature calibrator: each row's segment temperature,
    the global one (``fallback``) for a row whose segment the fit did not see, or for every row when
    ``segments`` is None. InvalidInput for segments sent to any other calibrator."""
    calibrator = entry.calibrator
    if not _segmented(calibrator):
        method = getattr(calibrator, "method", None)
        raise InvalidInput(
            f"segments are for a segment_temperature calibrator; calibrator version {entry.version} is "
            f"{method or 'none (plain softmax)'}",
            field="segments",
        )
    logits = workflows.scores_to_logits(scores, from_logits=from_logits, transform=True)
    if n_label_classes(logits.shape[1]) != calibrator.num_classes_:
        calibrator.transform(logits)  # raises the calibrator's own message
    if segments is None:
        probabilities = calibrator.transform(logits, validate=False)
        return probabilities, np.ones(len(probabilities), dtype=bool)
    return calibrator.transform_segments(logits, segments, validate=False)


def calibrate_intervals(
    entry: ActiveCalibrator, scores: Any, *, from_logits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, intervals)`` of a calibrator that gives probability intervals (venn_abers: ``[p0,
    p1]`` per row and class, shape ``(n, K, 2)``); InvalidInput for any other calibrator."""
    calibrator = entry.calibrator
    if calibrator is None or not hasattr(calibrator, "transform_intervals"):
        method = getattr(calibrator, "method", None)
        raise InvalidInput(
            f"probability intervals come from a venn_abers calibrator; calibrator version {entry.version} is "
            f"{method or 'none (plain softmax)'}",
            field="intervals",
        )
    logits = workflows.scores_to_logits(scores, from_logits=from_logits, transform=True)
    if n_label_classes(logits.shape[1]) != calibrator.num_classes_:
        calibrator.transform(logits)  # raises the calibrator's own message
    return calibrator.transform(logits, validate=False), calibrator.transform_intervals(
        logits, validate=False
    )


class DataPlane:
    """The use cases over one worker's :class:`AppState`."""

    def __init__(self, state: AppState, monitoring_store: MonitoringStore | None = None) -> None:
        self.state = state
        self.upstream_models = UpstreamModels(state.upstreams)
        store = monitoring_store if monitoring_store is not None else open_store(state.settings)
        self.monitoring = Monitoring(store, state.settings, self.calibrator_view)

    # ------------------------------------------------------------------------------------------ health

    @property
    def ready(self) -> bool:
        return self.state.ready

    def require_ready(self) -> None:
        self.state.require_ready()

    def stalled_models(self) -> dict[str, str]:
        """Models with a forward pass past the time limit that has not returned (it holds a thread of the
        model's own until it does): name -> reason."""
        return self.state.registry.stalled()

    async def readiness(self) -> dict[str, Any]:
        """NotReady until loaded. A store that cannot be written (read-only volume, disk full) is reported
        under ``store`` but keeps the service ready: calibrate and predict still serve the active
        calibrators, and an orchestrator that took every replica out of rotation for it would turn a
        failing write into an outage."""
        self.state.require_ready()
        await self.require_upstreams_ready()
        try:
            await in_thread(self.state.store.check_writable)  # it fsyncs: never on the event loop
            store = {"writable": True, "detail": None}
        except StoreUnavailable as exc:
            store = {"writable": False, "detail": str(exc)}
        view_age_s = getattr(self.state.store, "view_age_s", None)
        if view_age_s is not None:  # S3: how old the cached view is while the bucket cannot be read
            store["view_age_s"] = round(view_age_s, 3)
        return {
            "status": "ready",
            "models": sorted(self.state.registry.names()),
            "failing_models": self.state.registry.failing(),
            "pending_models": self.state.pending(),
            "store": store,
            "upstreams": {url: {"ready": True} for url in self.state.upstreams.urls()},
        }

    def store_view_age(self) -> float:
        """Seconds since an S3 store was last read while it cannot be read; 0 otherwise (and always for a
        directory store)."""
        return float(getattr(self.state.store, "view_age_s", 0.0))

    async def require_upstreams_ready(self) -> None:
        """NotReady naming every upstream server that is not ready (the default one and those this worker
        called), with why: the service stays live, and serves its other models meanwhile."""
        urls = self.state.upstreams.urls()
        if not urls:
            return
        down = await self.state.upstreams.not_ready(urls)
        if down:
            raise NotReady(
                "; ".join(f"upstream {url} is not ready: {reason}" for url, reason in down.items())
            )

    # -------------------------------------------------------------------------------------------- models

    def model(self, name: str) -> ModelInfo:
        self.state.require_ready()
        return self.state.model_info(name)

    def model_summary(self, info: ModelInfo) -> dict[str, Any]:
        """The model's JSON form with a summary of its active calibrator."""
        active = self.state.active(info.name).document
        body = info.to_dict()
        body["active_calibrator"] = (
            None
            if active is None
            else {
                key: active[key] for key in ("version", "method", "temperature", "fitted_at") if key in active
            }
        )
        return body

    def list_models(self, *, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        self.state.require_ready()
        names = [name for name in self.state.all_model_names() if cursor is None or name > cursor]
        page = names[:limit]
        items = [self.model_summary(self.state.model_info(name)) for name in page]
        return items, (page[-1] if len(names) > limit else None)

    async def put_model(
        self,
        name: str,
        *,
        num_classes: int,
        class_names: list[str] | None,
        description: str | None,
        upstream: Mapping[str, Any] | None = None,
        task: str | None = None,
    ) -> tuple[ModelInfo, bool]:
        """Create or update a logits-only model, or one served by an upstream inference server
        (``upstream``: url, model, version, output); ``(the model, whether it was created)``. ``task``
        ``multilabel`` declares K independent sigmoid outputs (``num_classes`` = K labels)."""
        self.state.require_ready()
        task = check_task(task) if task is not None else None
        spec = None
        if upstream is not None:
            spec = UpstreamSpec.from_record(upstream, default_model=name)
            self.state.upstreams.client(spec)  # InvalidInput without a url or a default upstream
        if class_names is not None and len(class_names) != num_classes:
            raise InvalidInput(
                f"class_names has {len(class_names)} names for {num_classes} classes", field="class_names"
            )
        loaded = self.state.registry.loaded(name)
        if loaded is not None and loaded.num_classes is not None and loaded.num_classes != num_classes:
            raise Conflict(f"model {name!r} is a TorchScript model with {loaded.num_classes} classes")
        active = self.state.store.active_calibrator(name) if self.state.store.model_exists(name) else None
        if active is not None and active.get("num_classes") not in (None, num_classes):
            raise Conflict(
                f"model {name!r} has an active calibrator for {active['num_classes']} classes; "
                "delete the model first to change its class count"
            )
        if (
            task is not None
            and active is not None
            and (active.get("task") == "multilabel") != (task == "multilabel")
        ):
            raise Conflict(
                f"model {name!r} has an active calibrator of another task; delete the model first to change "
                "its task"
            )
        if loaded is not None and spec is not None:
            raise Conflict(
                f"model {name!r} is a TorchScript model; an upstream model needs a name of its own"
            )
        fields = {
            "num_classes": num_classes,
            "class_names": class_names,
            "description": description,
            "upstream": spec.to_record() if spec is not None else None,
            "task": task,
        }
        kind = "upstream" if spec is not None else "logits"
        metadata = {"kind": kind, **{key: value for key, value in fields.items() if value is not None}}
        existed = self.state.store.model_exists(name)
        if existed:
            old = self.state.store.get_model(name)
            metadata = {**old, **metadata, "kind": kind if spec is not None else old.get("kind", "logits")}
        await in_thread(self.state.store.put_model, name, metadata)
        return self.state.model_info(name), not existed and loaded is None

    async def put_torchscript(self, name: str, data: bytes, metadata: Mapping[str, Any]) -> ModelInfo:
        """Upload a TorchScript file: checked first, so a file torch cannot run never replaces a model."""
        self.state.require_ready()
        if not data:
            raise InvalidInput("the request body is empty; send the TorchScript file's bytes", field="body")
        record = self.state.store.get_model(name) if self.state.store.model_exists(name) else {}
        record = {**record, **metadata}
        checked = await in_thread(self.state.registry.check_bytes, name, data, record)
        record = {**record, "kind": "torchscript", "num_classes": checked.num_classes}
        await in_thread(self.state.store.put_model, name, record)
        await in_thread(self.state.store.put_torchscript, name, data)
        self.state.install_uploaded(checked)
        return self.state.model_info(name)

    async def delete_model(self, name: str) -> None:
        self.state.require_ready()
        self.state.model_info(name)  # NotFound for an unknown model
        store = self.state.store
        if self.state.is_shipped(name):
            raise Conflict(
                f"model {name!r} is shipped in the models directory; remove its folder there instead"
            )
        await in_thread(store.delete_model, name)
        with contextlib.suppress(NotFound):  # a logits-only model has nothing in the registry
            self.state.registry.remove(name)
        self.state.forget(name)

    def calibrator_versions(self, name: str, *, limit: int) -> list[int]:
        """Versions of ``name``, newest first (none for a shipped model without a store record)."""
        try:
            items, _ = self.state.store.list_calibrators(name, limit=limit)
        except NotFound:
            return []
        return [item["version"] for item in items]

    # --------------------------------------------------------------------------------------- calibrators

    def lookup(self, name: str, version: int | None) -> tuple[ModelInfo, ActiveCalibrator]:
        """The model and the calibrator that serves it (the active one, or ``version``)."""
        self.state.require_ready()
        return self.state.lookup(name, version)

    async def lookup_async(self, name: str, version: int | None) -> tuple[ModelInfo, ActiveCalibrator]:
        """:meth:`lookup`, in a thread when it would wait for a remote store (S3), else inline (a dict
        lookup and two ``stat`` s cost less than a thread hop)."""
        if self.state.lookup_blocks(name, version):
            return await in_thread(self.lookup, name, version)
        return self.lookup(name, version)

    def list_calibrators(self, name: str, *, limit: int, cursor: str | None) -> dict[str, Any]:
        """One page of versions, newest first, as summaries (:func:`calibrator_summary`): a document can
        weigh megabytes (a histogram's bins, a matrix), and the full one is a request away."""
        self.state.require_ready()
        self.state.model_info(name)
        items, next_cursor = self.state.store.list_calibrators(name, limit=limit, cursor=cursor)
        return {
            "items": [calibrator_summary(item) for item in items],
            "next_cursor": next_cursor,
            "active_version": self.state.store.active_version(name),
        }

    def get_calibrator(self, name: str, version: int) -> dict[str, Any]:
        self.state.require_ready()
        return self.state.store.get_calibrator(name, version)

    def stored_reliability(self, name: str, version: int) -> dict[str, Any]:
        """The reliability bins version ``version`` stores of its fit data, as a report's
        (:func:`workflows.stored_reliability`); NotFound where it stores none."""
        report = workflows.stored_reliability(self.get_calibrator(name, version))
        if report is None:
            raise NotFound(
                f"calibrator version {version} of model {name!r} stores no reliability bins of its fit data "
                "(fitted before they were stored, or uploaded without them): draw its diagram on labelled data "
                f"with POST /v1/models/{name}/evaluate/diagram?version={version}",
                field="version",
            )
        return report

    async def activate(self, name: str, version: int) -> dict[str, Any]:
        self.state.require_ready()
        document = await in_thread(self.state.store.activate, name, version)
        publish_active(name, document)
        return document

    async def delete_calibrator(self, name: str, version: int) -> None:
        self.state.require_ready()
        await in_thread(self.state.store.delete_calibrator, name, version)
        self.state.forget(name)

    def budget(self) -> Budget:
        """The time a fit, evaluation or figures computation may take (``CALIBSERVE_MAX_WORK_SECONDS``); a
        codec may :meth:`~Budget.cancel` it when its client goes away."""
        return Budget(self.state.settings.max_work_seconds)

    async def fit(
        self, name: str, data: Labelled, spec: FitSpec, budget: Budget | None = None
    ) -> dict[str, Any]:
        """Fit a calibrator on labelled scores (or inputs run through the model), store it, and (unless
        ``spec.activate`` is false) activate it; the stored document."""
        self.state.require_ready()
        info = self.state.model_info(name)
        scores, from_logits = await self._scores(info, data)
        if info.task == "multilabel":
            if spec.conformal is not None or spec.conformal_fraction is not None:
                raise InvalidInput(
                    "conformal prediction sets are for softmax models, not multi-label ones",
                    field="conformal",
                )
            return await self._fit_multilabel(info, scores, from_logits, data, spec, budget)
        fit = workflows.fit_document
        conformal: dict[str, Any] = {}
        if spec.conformal is not None:
            fit = workflows.fit_conformal_document
            conformal = {"conformal": spec.conformal, "conformal_fraction": spec.conformal_fraction}
        elif spec.conformal_fraction is not None:
            raise InvalidInput("conformal_fraction goes with conformal", field="conformal_fraction")
        document = await bounded(
            budget or self.budget(),
            fit,
            scores,
            data.labels,
            from_logits=from_logits,
            method=spec.method,
            options=spec.options,
            model=name,
            num_classes=info.num_classes,
            sample_weight=data.sample_weight,
            segments=data.segments,
            **conformal,
        )
        stored = await self._store(info, document, activate=spec.activate)
        FITS.labels(name, spec.method).inc()
        return stored

    async def _fit_multilabel(
        self,
        info: ModelInfo,
        scores: np.ndarray,
        from_logits: bool,
        data: Labelled,
        spec: FitSpec,
        budget: Budget | None,
    ) -> dict[str, Any]:
        """A multi-label model's fit: a binary calibrator per label (:mod:`service.multilabel_workflows`)."""
        if data.segments is not None:
            raise InvalidInput("segments are not supported for a multi-label model", field="segments")
        document = await bounded(
            budget or self.budget(),
            multilabel_workflows.fit_document,
            scores,
            data.labels,
            from_logits=from_logits,
            method=spec.method,
            options=spec.options,
            model=info.name,
            num_labels=info.num_classes,
            sample_weight=data.sample_weight,
        )
        stored = await self._store(info, document, activate=spec.activate)
        FITS.labels(info.name, spec.method).inc()
        return stored

    async def upload_calibrator(self, name: str, document: Any, *, activate: bool) -> dict[str, Any]:
        """Store a calibrator document made elsewhere (e.g. by ``calibserve fit``) as a new version."""
        self.state.require_ready()
        calibrator = workflows.load_calibrator(document)  # refuses malformed documents before any write
        workflows.load_conformal(document)  # and a malformed conformal block
        info = self.state.model_info(name)
        if (info.task == "multilabel") != (getattr(calibrator, "task", None) == "multilabel"):
            raise InvalidInput(
                f"model {name!r} is {info.task}; the calibrator document is "
                f"{'multilabel' if getattr(calibrator, 'task', None) == 'multilabel' else 'multiclass'}",
                field="task",
            )
        if info.num_classes is not None and document.get("num_classes") not in (None, info.num_classes):
            raise InvalidInput(
                f"the calibrator was fitted for {document.get('num_classes')} classes; "
                f"model {name!r} has {info.num_classes}",
                field="num_classes",
            )
        document = {**document, **calibrator.to_dict(), "format_version": workflows.FORMAT_VERSION}
        return await self._store(info, document, activate=activate)

    async def _store(self, info: ModelInfo, document: dict[str, Any], *, activate: bool) -> dict[str, Any]:
        await in_thread(self.state.ensure_record, info, document.get("num_classes"))
        stored = await in_thread(self.state.store.add_calibrator, info.name, document, activate=activate)
        if activate:
            publish_active(info.name, stored)
        return stored

    # ---------------------------------------------------------------------------------------- inference

    async def calibrate(
        self,
        name: str,
        version: int | None,
        kind: str,
        scores: np.ndarray,
        segments: Any = None,
        seed: int | None = None,
        *,
        intervals: bool = False,
    ) -> Prediction:
        """Calibrated probabilities for ``scores`` (``kind`` logits or probabilities), with a segment per row
        for a segment_temperature calibrator, prediction sets when the version has conformal sets
        (randomised ones drawn from ``seed``, or fresh entropy without one), and each row's probability
        intervals when ``intervals`` (venn_abers calibrators only)."""
        info, entry = await self.lookup_async(name, version)
        if info.task == "multilabel":
            return await self._calibrate_multilabel(info, entry, kind, scores, segments)
        check_columns(info, scores, kind)
        fallback = bounds = None
        if intervals:
            if segments is not None:
                raise InvalidInput("segments and intervals are for different calibrators", field="intervals")
            probabilities, bounds = await compute(
                calibrate_intervals, entry, scores, from_logits=kind == "logits", size=scores.size
            )
        elif segments is not None or _segmented(entry.calibrator):
            probabilities, fallback = await compute(
                calibrate_segments, entry, scores, segments, from_logits=kind == "logits", size=scores.size
            )
        else:
            probabilities = await compute(
                calibrate_array, entry.calibrator, scores, from_logits=kind == "logits", size=scores.size
            )
        ids = None
        if self.monitoring.logs(name):
            logits = scores if kind == "logits" else workflows.scores_to_logits(scores, from_logits=False)
            ids = self.monitoring.record(name, entry.version, logits, probabilities)
        sets = await _prediction_sets(entry, probabilities, seed) if entry.conformal is not None else {}
        return Prediction(
            info, probabilities, entry.version, ids=ids, segment_fallback=fallback, intervals=bounds, **sets
        )

    async def _calibrate_multilabel(
        self, info: ModelInfo, entry: ActiveCalibrator, kind: str, scores: np.ndarray, segments: Any
    ) -> Prediction:
        """K sigmoid probabilities per row of a multi-label model (not logged: the prediction log and its
        monitoring are for softmax models)."""
        if segments is not None:
            raise InvalidInput("segments are not supported for a multi-label model", field="segments")
        if scores.ndim == 2:
            check_label_count(scores.shape[1], info.num_classes, kind)
        probabilities = await compute(
            multilabel_workflows.calibrate,
            entry.calibrator,
            scores,
            from_logits=kind == "logits",
            size=scores.size,
        )
        return Prediction(info, probabilities, entry.version)

    async def predict(
        self,
        name: str,
        version: int | None,
        inputs: np.ndarray,
        segments: Any = None,
        seed: int | None = None,
    ) -> Prediction:
        """The model's logits for ``inputs`` (TorchScript, or an upstream server's), calibrated (with a
        segment per row for a segment_temperature calibrator)."""
        info, entry = await self.lookup_async(name, version)
        if info.kind == "upstream":
            logits = await self.upstream_models.logits(info, entry, inputs)
            probabilities = None
        elif info.kind != "torchscript":
            raise InvalidInput(f"model {name!r} is logits-only; send its logits to calibrate", field="inputs")
        else:
            logits, probabilities = await self._run_model(
                name, entry, inputs, multilabel=info.task == "multilabel"
            )
        if info.task == "multilabel":
            prediction = await self._calibrate_multilabel(info, entry, "logits", logits, segments)
            return Prediction(info, prediction.probabilities, entry.version, logits)
        fallback = None
        if segments is not None or _segmented(entry.calibrator):
            probabilities, fallback = await compute(
                calibrate_segments, entry, logits, segments, from_logits=True, size=logits.size
            )
        elif probabilities is None:
            probabilities = await compute(
                calibrate_array, entry.calibrator, logits, from_logits=True, size=logits.size
            )
        ids = self.monitoring.record(name, entry.version, logits, probabilities)
        sets = await _prediction_sets(entry, probabilities, seed) if entry.conformal is not None else {}
        return Prediction(info, probabilities, entry.version, logits, ids, segment_fallback=fallback, **sets)

    async def upstream_model_async(
        self, name: str, version: int | None
    ) -> tuple[ModelInfo, ActiveCalibrator] | None:
        """:meth:`upstream_model`, in a thread when its lookup would wait for a remote store (S3)."""
        if self.state.lookup_blocks(name, version):
            return await in_thread(self.upstream_model, name, version)
        return self.upstream_model(name, version)

    def upstream_model(self, name: str, version: int | None) -> tuple[ModelInfo, ActiveCalibrator] | None:
        """The model and calibrator of ``name`` when an upstream server serves it (NotFound for a calibrator
        version it does not have), else None (a model unknown here is the caller's to answer)."""
        try:
            info, active = self.lookup(name, None)  # one lookup (two stats) in the request path, not two
        except NotFound:
            return None
        if info.kind != "upstream":
            return None
        return (info, active) if version is None else self.lookup(name, version)

    async def infer_upstream(
        self,
        info: ModelInfo,
        entry: ActiveCalibrator,
        document: Mapping[str, Any],
        binary: bytes,
        raw: tuple[bytes, Mapping[str, str]],
    ) -> UpstreamPrediction | PassedThrough:
        """An Open Inference Protocol request of an upstream model: its inputs go upstream unchanged, and
        the logits that come back are calibrated. A name only the default upstream knows (transparent mode)
        passes through until it has a calibrator: ``raw`` (the request's body and headers) goes as it came,
        and comes back so."""
        if info.transparent and entry.version is None:
            return await self.upstream_models.forward(info, *raw)
        answer = await self.upstream_models.infer(info, entry, document, binary)
        if info.task == "multilabel":  # K sigmoid probabilities per row, not logged (as calibrate)
            probabilities = await compute(
                multilabel_workflows.calibrate, entry.calibrator, answer.logits, size=answer.logits.size
            )
            return UpstreamPrediction(info, answer, probabilities, entry.version)
        probabilities = await compute(
            calibrate_array, entry.calibrator, answer.logits, from_logits=True, size=answer.logits.size
        )
        ids = self.monitoring.record(info.name, entry.version, answer.logits, probabilities)
        sets = {}
        if entry.conformal is not None:
            sets = await _prediction_sets(entry, probabilities, _request_seed(document))
        return UpstreamPrediction(info, answer, probabilities, entry.version, ids, **sets)

    async def upstream_metadata(self, info: ModelInfo) -> dict[str, Any]:
        """The upstream server's metadata of the model."""
        return await self.upstream_models.metadata(info)

    async def upstream_not_ready(self, info: ModelInfo) -> str | None:
        """Why the upstream server's model is not ready, or None."""
        return await self.upstream_models.not_ready(info)

    async def _run_model(
        self, name: str, entry: ActiveCalibrator, inputs: np.ndarray, *, multilabel: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, probabilities)`` of TorchScript model ``name``; probabilities None: calibrate on the CPU.

        On a GPU the calibrator runs there, after the forward pass, as one vectorised operation (its exported
        torch module); on the CPU numpy's exact float64 calibration follows instead. With dynamic batching
        on, concurrent requests share the forward pass.
        """
        state = self.state
        await self._sync_uploaded(name)
        registry = state.registry
        model, batch = await compute(registry.prepare, name, inputs, size=inputs.size)
        calibrator = entry.calibrator
        # A calibrator fitted for another class count is left to the CPU path, which names the mismatch.
        # (a segment calibrator has no module: its rows' temperatures hang on keys, applied on the CPU)
        # (a multi-label model's logits are calibrated on the CPU, per label, after the pass)
        fits = not multilabel and (
            calibrator is None
            or (calibrator.num_classes_ == model.num_classes and not _segmented(calibrator))
        )
        on_device = model.device.type != "cpu" and fits

        def run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            module = registry.calibrator_on_device(model, calibrator) if on_device else None
            return registry.run(model, rows, module)

        try:
            if state.batcher is not None:
                key = (id(model), id(calibrator), on_device)  # both held by `run` while queued: ids unique
                return await state.batcher.submit(key, batch, run)
            # The pass runs on the model's own threads and the event loop waits for it, time-limited:
            # a model that stalls holds none of the pool's threads (see ModelRegistry.submit).
            module = registry.calibrator_on_device(model, calibrator) if on_device else None
            future = registry.submit(model, batch, module)
            try:
                return await wait_for(future, registry.timeout)
            except TimeoutError:
                error = registry.expire(model, future)
                if error is None:  # it answered just now
                    return future.result()
                raise error from None
        except ModelFailed:
            MODEL_FAILURES.labels(name).inc()
            raise

    async def _sync_uploaded(self, name: str) -> None:
        """Load an uploaded model whose file changed (another worker's upload) in a thread: a load runs
        the file's time-limited smoke check, never on the event loop. NotReady while it is pending."""
        # Asking an S3 store whether the file changed is a request (at most every refresh_s): in the thread too.
        if self.state.store.remote or self.state.uploaded_model_changed(name):
            await in_thread(self.state.sync_uploaded_model, name)

    async def _scores(self, info: ModelInfo, data: Labelled) -> tuple[np.ndarray, bool]:
        """Scores of a labelled set: logits/probabilities as sent, or inputs run through the model (here, or
        on its upstream server)."""
        if info.kind == "upstream" and data.kind in ("inputs", "upstream_inputs"):
            entry = self.state.active(info.name)
            return await self.upstream_models.logits(info, entry, data.values), True
        if data.kind == "upstream_inputs":
            raise InvalidInput(
                f"model {info.name!r} is not served upstream; upstream_inputs are for upstream models",
                field="upstream_inputs",
            )
        if data.kind != "inputs":
            return data.values, data.kind == "logits"
        if info.kind != "torchscript":
            raise InvalidInput(
                f"model {info.name!r} is logits-only; send logits or probabilities", field="inputs"
            )
        await self._sync_uploaded(info.name)
        try:
            logits = await in_thread(self.state.registry.predict, info.name, data.values)
        except ModelFailed:
            MODEL_FAILURES.labels(info.name).inc()
            raise
        return logits, True

    # --------------------------------------------------------------------------------------- monitoring

    def calibrator_view(self, name: str, version: int | None) -> CalibratorView:
        """Calibrator ``version`` of ``name`` (the active one: None) as outcomes are scored with it."""
        _, entry = self.lookup(name, version)
        return CalibratorView(entry.version or 0, entry.calibrator, entry.document)

    def metrics_collectors(self) -> list[MonitoringCollector]:
        """What ``/metrics`` adds to the process's series: the monitoring gauges of the active calibrators."""

        def active_of(name: str) -> CalibratorView | None:
            try:
                return self.calibrator_view(name, None)
            except NotFound:
                return None

        return [MonitoringCollector(lambda: self.monitoring.gauges(active_of))]

    async def outcomes(
        self,
        name: str,
        labels: Any,
        *,
        prediction_ids: Any = None,
        kind: str | None = None,
        scores: np.ndarray | None = None,
        calibrator_version: int | None = None,
    ) -> dict[str, Any]:
        """Labels for logged predictions (``prediction_ids``), or labelled scores (``kind`` logits or
        probabilities) scored with ``calibrator_version`` (the active one when None)."""
        info = self.model(name)
        _no_live_monitoring(info)
        if prediction_ids is not None:
            return await in_thread(self.monitoring.outcomes_by_id, name, prediction_ids, labels)
        if scores is None or kind not in SCORE_KINDS:
            raise InvalidInput(
                "send prediction_ids, or logits or probabilities, with the labels", field="body"
            )
        logits = await in_thread(workflows.scores_to_logits, scores, from_logits=kind == "logits")
        check_columns(info, logits, kind)
        return await in_thread(self.monitoring.outcomes_by_scores, name, logits, labels, calibrator_version)

    async def monitoring_report(self, name: str, window: str, version: int | None) -> dict[str, Any]:
        """Figures, label-free estimates and drift of ``name``'s outcomes in the last ``window``."""
        _no_live_monitoring(self.model(name))
        active = self.calibrator_view(name, None)
        return await in_thread(self.monitoring.report, name, window, version, active)

    async def refit(self, name: str, spec: RefitSpec, budget: Budget | None = None) -> dict[str, Any]:
        """Fit a new version on the window's labelled outcomes, store it (inactive unless asked), and compare
        it with the active calibrator on a held-out part of those outcomes."""
        info, entry = await self.lookup_async(name, None)
        _no_live_monitoring(info)
        if spec.activate not in (True, False, "if_better"):
            raise InvalidInput('activate must be true, false or "if_better"', field="activate")
        if not 0.0 < spec.holdout < 1.0:
            raise InvalidInput(f"holdout must be a fraction in (0, 1), got {spec.holdout!r}", field="holdout")
        logits, labels = await in_thread(self.monitoring.labelled, name, spec.window)
        fit_rows, held_rows = _refit_split(len(labels), spec.holdout, spec.seed)
        document = await bounded(
            budget or self.budget(),
            workflows.fit_document,
            logits[fit_rows],
            labels[fit_rows],
            from_logits=True,
            method=spec.method,
            options=spec.options,
            model=name,
            num_classes=info.num_classes,
        )
        candidate = workflows.load_calibrator(document)
        new = await in_thread(_held_out_figures, candidate, logits[held_rows], labels[held_rows])
        current = await in_thread(_held_out_figures, entry.calibrator, logits[held_rows], labels[held_rows])
        activate = new["nll"] < current["nll"] if spec.activate == "if_better" else bool(spec.activate)
        stored = await self._store(info, document, activate=activate)
        FITS.labels(name, spec.method).inc()
        return {
            "calibrator": calibrator_summary(stored),
            "activated": activate,
            "window": spec.window,
            "n_fit": len(fit_rows),
            "n_holdout": len(held_rows),
            "holdout": {
                "new": {"version": stored["version"], **new},
                "active": {"version": entry.version, **current},
            },
            "improves_nll": new["nll"] < current["nll"],
        }

    # ------------------------------------------------------------------------------------------ figures

    async def evaluate(
        self, name: str, version: int | None, data: Labelled, spec: EvaluateSpec, budget: Budget | None = None
    ) -> dict:
        """Figures before and after calibration, and drift against the calibrator's fit-time figures."""
        info, entry = await self.lookup_async(name, version)
        scores, from_logits = await self._scores(info, data)
        if info.task == "multilabel":
            _check_multilabel_evaluation(spec)
            report = await bounded(
                budget or self.budget(),
                multilabel_workflows.evaluate,
                scores,
                data.labels,
                from_logits=from_logits,
                calibrator=entry.calibrator,
                calibrator_document=entry.document,
                n_bins=spec.n_bins,
                num_labels=info.num_classes,
                label_names=info.class_names,
            )
            report["model"] = name
            return report
        check_columns(info, scores, data.kind)
        report = await bounded(
            budget or self.budget(),
            workflows.evaluate,
            scores,
            data.labels,
            from_logits=from_logits,
            calibrator=entry.calibrator,
            calibrator_document=entry.document,
            n_bins=spec.n_bins,
            binning=spec.binning,
            bootstrap=spec.bootstrap,
            seed=spec.seed,
            nll_clip=spec.nll_clip,
            ece_convention=spec.ece_convention,
            per_class_tests=spec.per_class_tests,
            segments=spec.segments,
            min_segment_size=spec.min_segment_size,
            conformal=spec.conformal,
            conformal_fraction=spec.conformal_fraction,
        )
        report["model"] = name
        return report

    async def figures(
        self,
        data: Labelled,
        spec: EvaluateSpec,
        *,
        with_losses: bool,
        budget: Budget | None = None,
        task: str | None = None,
    ) -> dict[str, Any]:
        """Stateless: every calibration figure (and the evaluation losses) of labelled scores; of per-label
        scores with ``task`` multilabel (the per-label, macro and micro figures; no losses)."""
        if task == "multilabel":
            _check_multilabel_evaluation(spec)
            return await bounded(budget or self.budget(), _multilabel_figures, data, spec)
        return await bounded(budget or self.budget(), _figures, data, spec, with_losses)

    # ------------------------------------------------------------------------------------------- export

    async def export(self, name: str, version: int | None, file_format: str) -> tuple[bytes, int | None]:
        """The model's calibration as one file (TorchScript); ``(bytes, calibrator version)``."""
        require_module("torch", needed_for="an export (a TorchScript file)")
        from service.export import EXPORT_FORMATS, export_torchscript  # torch: only where a file is made

        if file_format not in EXPORT_FORMATS:
            raise InvalidInput(
                f"export format {file_format!r} is not supported; use one of {', '.join(EXPORT_FORMATS)}",
                field="format",
            )
        info, entry = await self.lookup_async(name, version)
        model = None
        if info.kind == "torchscript":
            await self._sync_uploaded(name)
            model = self.state.registry.get(name)  # ModelFailed for a model that failed to load
        metadata = {
            "model": name,
            "kind": info.kind,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names) if info.class_names else None,
            "input": "inputs" if model is not None else "logits",
            "input_shape": list(model.input_shape) if model is not None and model.input_shape else None,
            "calibrator_version": entry.version,
            "calibrator": entry.document,
            **({"task": "multilabel"} if info.task == "multilabel" else {}),
        }
        data = await in_thread(
            export_torchscript, entry.calibrator, model=model, metadata=metadata, conformal=entry.conformal
        )
        return data, entry.version


def _check_multilabel_evaluation(spec: EvaluateSpec) -> None:
    """InvalidInput naming the evaluation options a multi-label model's figures do not have (its figures
    are per label, equal-width bins, exact NLL)."""
    default = EvaluateSpec()
    unsupported = [
        name
        for name in ("binning", "bootstrap", "nll_clip", "ece_convention", "per_class_tests", "segments")
        if getattr(spec, name) != getattr(default, name)
    ]
    if unsupported:
        raise InvalidInput(
            f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not supported for a "
            "multi-label model (its figures are per label, with equal-width bins and the exact NLL)",
            field=unsupported[0],
        )


def _no_live_monitoring(info: ModelInfo) -> None:
    """InvalidInput for a multi-label model: the prediction log, outcomes, monitoring windows and refits
    keep one top-label row per prediction (softmax models); a multi-label model's calibration is checked
    with evaluate and drift (the CLI's ``calibserve drift``) instead."""
    if info.task == "multilabel":
        raise InvalidInput(
            f"model {info.name!r} is multilabel: live monitoring (outcomes, monitoring windows, refits) is not "
            "supported for multi-label models; check them with evaluate or calibserve drift",
            field="task",
        )


async def _prediction_sets(entry: ActiveCalibrator, probabilities: np.ndarray, seed: int | None) -> dict:
    """``prediction_sets`` and ``alpha`` of a Prediction: empty for a version without conformal sets."""
    if entry.conformal is None:  # a seed sent anyway is ignored, as for non-randomised sets
        return {}
    sets = await compute(
        workflows.conformal_sets, entry.conformal, probabilities, seed, size=probabilities.size
    )
    return {"prediction_sets": sets, "alpha": entry.conformal.spec.alpha}


def _request_seed(document: Mapping[str, Any]) -> int | None:
    """``parameters.seed`` of an Open Inference Protocol request (of randomised prediction sets), checked."""
    parameters = document.get("parameters")
    seed = parameters.get("seed") if isinstance(parameters, Mapping) else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidInput(f"parameters.seed must be an integer >= 0, got {seed!r}", field="parameters.seed")
    return seed


def _refit_split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit rows, held-out rows)``: a seeded shuffle, ``holdout`` of the rows held out (at least one each)."""
    if n < 4:
        raise InvalidInput(
            f"a refit needs at least 4 labelled outcomes in the window, got {n}", field="window"
        )
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, round(n * holdout)), n - 2)
    return np.sort(order[held:]), np.sort(order[:held])


def _held_out_figures(calibrator: Any, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    report = workflows.evaluate(logits, labels, from_logits=True, calibrator=calibrator)
    figures = report["calibrated"] if calibrator is not None else report["uncalibrated"]
    return {key: figures[key] for key in ("ece", "mce", "brier", "nll", "accuracy") if key in figures}


SUMMARY_KEYS = ("version", "model", "method", "num_classes", "temperature", "fitted_at")


def calibrator_summary(document: Mapping[str, Any]) -> dict[str, Any]:
    """What a listing shows of a calibrator version: its identity, method, fit time and fit-time headline
    figures (``ece``, ``nll`` before and after), never its parameters."""
    summary = {key: document[key] for key in SUMMARY_KEYS if key in document}
    fit = document.get("fit")
    if isinstance(fit, Mapping):
        summary["fit"] = {"n": fit.get("n")}
        for group in ("before", "after"):
            figures = fit.get(group)
            if isinstance(figures, Mapping):
                summary["fit"][group] = {key: figures.get(key) for key in ("ece", "nll", "accuracy")}
    sets = document.get("conformal")
    if isinstance(sets, Mapping):  # which prediction sets the version answers, not their thresholds
        summary["conformal"] = {key: sets.get(key) for key in ("score", "alpha", "mondrian", "randomized")}
    return summary


def _multilabel_figures(data: Labelled, spec: EvaluateSpec) -> dict[str, Any]:
    report = multilabel_workflows.evaluate(
        data.values, data.labels, from_logits=data.kind == "logits", n_bins=spec.n_bins
    )
    return {
        **report["uncalibrated"],
        "task": "multilabel",
        "reliability_per_label": report["reliability_per_label"]["uncalibrated"],
    }


def _figures(data: Labelled, spec: EvaluateSpec, with_losses: bool) -> dict[str, Any]:
    from_logits = data.kind == "logits"
    report = workflows.evaluate(
        data.values,
        data.labels,
        from_logits=from_logits,
        n_bins=spec.n_bins,
        binning=spec.binning,
        bootstrap=spec.bootstrap,
        seed=spec.seed,
        nll_clip=spec.nll_clip,
        ece_convention=spec.ece_convention,
        per_class_tests=spec.per_class_tests,
        segments=spec.segments,
        min_segment_size=spec.min_segment_size,
    )
    answer = {
        **report["uncalibrated"],
        "conventions": report["conventions"],
        "reliability": report["reliability"]["uncalibrated"],
        "reliability_smooth": report["reliability_smooth"]["uncalibrated"],
    }
    if "intervals" in report:
        answer["intervals"] = report["intervals"]["uncalibrated"]
    if "per_class_tests" in report:
        answer["per_class_tests"] = report["per_class_tests"]["uncalibrated"]
    if "segments" in report:
        answer["segments"] = report["segments"]
    if with_losses:
        logits = workflows.scores_to_logits(data.values, from_logits=from_logits)
        answer["losses"] = losses.evaluation_losses(logits, data.labels)
    return answer
