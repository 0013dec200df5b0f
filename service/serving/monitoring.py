"""Calibration on live traffic: the prediction log, outcomes, rolling windows, drift, refits from outcomes.

Served rows are logged (when the prediction log is on for their model) by a background writer in group
commits: an answer pays for an id prefix and a queue entry, never for a disk write. An outcome joins its
prediction by id, is scored with the calibrator version that answered, and is added to the bin sums of the
minute the prediction was made, in one durable transaction per call (:mod:`service.monitoring_store`). A
window's figures are sums of those bins; drift compares them with the calibrator's fit-time figures using
the ``calibserve drift`` rules (``ece+0.02``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import workflows
from service.config import Settings
from service.core import monitoring as stats
from service.core.validation import check_labels
from service.errors import InvalidInput, InvalidParameter, NotFound
from service.monitoring_store import MonitoringStore, Outcome, PredictionBatch, SQLiteMonitoringStore
from service.names import parse_duration
from service.serving.telemetry import OUTCOMES, PREDICTION_LOG_ROWS

logger = logging.getLogger("calibserve.monitoring")

FLUSH_DELAY_S = 0.05
PRUNE_EVERY_S = 60.0
GAUGES_TTL_S = 5.0
# Largest window a query may ask for: what the retention keeps (the setting) caps it further.
MAX_WINDOW_S = 366 * 86400
NO_VERSION = 0


def open_store(settings: Settings) -> MonitoringStore:
    """The monitoring database the settings name: PostgreSQL for ``postgresql://`` URLs, else SQLite in the
    store directory."""
    url = settings.database_url
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise InvalidInput(f"database URL must be postgresql://..., got {url.split(':', 1)[0]}://...")
        from service.monitoring_postgres import PostgresMonitoringStore  # psycopg only where configured

        return PostgresMonitoringStore(url)
    return SQLiteMonitoringStore(settings.store_dir / "monitoring.sqlite3")


@dataclass(frozen=True, slots=True)
class PredictionIds:
    """The ids of one answer's rows: ``<prefix>.<row>``."""

    prefix: str
    rows: int

    def as_list(self) -> list[str]:
        return [f"{self.prefix}.{row}" for row in range(self.rows)]


class IdPrefixes:
    """Prefixes of answers' prediction ids: 12 random hex digits drawn per process (and again every 2^32
    answers) and an 8-digit counter. Unique across workers and replicas as random prefixes are, but a draw
    per process instead of per answer (a getrandom call was a third of what logging an answer cost), and
    each process's ids grow in order, so the log's primary key takes them at its end rather than at random
    places."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._draw()

    def _draw(self) -> None:
        self._random = secrets.token_hex(6)
        self._counter = itertools.count()

    def next(self) -> str:
        number = next(self._counter)  # atomic: itertools.count is one C call
        if number >= 1 << 32:
            with self._lock:
                if next(self._counter) >= 1 << 32:
                    self._draw()
            return self.next()
        return f"{self._random}{number:08x}"


class PredictionLog:
    """Collects answers' rows and writes them in group commits from one background thread, which wakes every
    :data:`FLUSH_DELAY_S` and takes everything collected meanwhile (an answer only appends to a list under a
    lock: no thread is woken per answer); prunes by age and row count every :data:`PRUNE_EVERY_S`. Rows not
    yet written when the process is killed are lost (an outcome for them is reported as unknown); outcomes
    themselves are written durably before they are acknowledged."""

    def __init__(self, store: MonitoringStore, *, max_age_s: float, max_rows: int) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.max_rows = max_rows
        self._pending: list[PredictionBatch] = []
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer at a time: the thread, or a flush
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="calibserve-prediction-log", daemon=True)
            self._thread.start()

    def add(self, batch: PredictionBatch) -> None:
        with self._pending_lock:
            self._pending.append(batch)

    def flush(self) -> None:
        """Write every row collected so far (before outcomes look their ids up); returns once it is written,
        whether by this call or by the writer thread's group in progress."""
        with self._write_lock:
            self._write(self._take())

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10.0)
            self._thread = None
        self.flush()

    def _take(self) -> list[PredictionBatch]:
        with self._pending_lock:
            batches, self._pending = self._pending, []
        return batches

    def _write(self, batches: list[PredictionBatch]) -> None:
        if not batches:
            return
        try:
            self.store.log_predictions(batches)
        except Exception:  # a full disk must not stop the writer; the rows are lost, and said so
            logger.exception(
                "prediction log: %d rows could not be written", sum(len(b.logits) for b in batches)
            )

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_DELAY_S):
            with self._write_lock:
                self._write(self._take())
                self._maybe_prune()

    def _maybe_prune(self) -> None:
        now = time.time()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        try:
            dropped = self.store.prune(older_than=now - self.max_age_s, max_rows=self.max_rows)
        except Exception:
            logger.exception("prediction log: pruning failed")
            return
        if dropped:
            logger.info("prediction log: %d old rows dropped", dropped)


@dataclass(frozen=True, slots=True)
class CalibratorView:
    """What scoring an outcome needs of a calibrator version: the calibrator (None: softmax) and its document."""

    version: int
    calibrator: Any
    document: Mapping[str, Any] | None


class Monitoring:
    """The monitoring use cases over one database; ``calibrator_of(name, version)`` gives a version's
    calibrator (NotFound when it does not exist)."""

    def __init__(
        self,
        store: MonitoringStore,
        settings: Settings,
        calibrator_of: Callable[[str, int | None], CalibratorView],
    ) -> None:
        self.store = store
        self.settings = settings
        self.calibrator_of = calibrator_of
        self.enabled = settings.prediction_log == "on"
        self.models = {name.strip() for name in settings.prediction_log_models.split(",") if name.strip()}
        self.max_age_s = parse_duration(settings.prediction_log_max_age, field="prediction_log_max_age")
        self.rules = workflows.parse_drift_rules(settings.monitoring_drift)
        self.log = PredictionLog(store, max_age_s=self.max_age_s, max_rows=settings.prediction_log_max_rows)
        self.windows = [part.strip() for part in settings.monitoring_windows.split(",") if part.strip()]
        for window in self.windows:
            parse_duration(window, field="monitoring_windows")
        self._gauges: tuple[float, list[tuple[str, str, str, float]]] | None = None
        self._references: dict[int, tuple[Mapping[str, Any], np.ndarray | None]] = {}
        self.prefixes = IdPrefixes()
        self._logged_rows: dict[str, Any] = {}  # model: its counter child (labels() takes a lock)

    def start(self) -> None:
        if self.enabled or self.models:
            self.log.start()

    def close(self) -> None:
        self.log.close()
        self.store.close()

    def logs(self, name: str) -> bool:
        return self.enabled or name in self.models

    # --------------------------------------------------------------------------------- prediction log

    def record(
        self, name: str, version: int | None, logits: np.ndarray, probabilities: np.ndarray
    ) -> PredictionIds | None:
        """Queue an answer's rows for the log; their ids (None when the model's predictions are not logged)."""
        if not self.logs(name) or len(logits) == 0:
            return None
        prefix = self.prefixes.next()
        confidence = np.asarray(probabilities).max(axis=1).astype(np.float64)
        logits = np.asarray(logits)
        if logits.ndim == 2 and logits.shape[1] == 1:  # one logit of class 1: store both columns' form
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        self.log.add(PredictionBatch(prefix, name, version or NO_VERSION, time.time(), logits, confidence))
        counter = self._logged_rows.get(name)
        if counter is None:
            if len(self._logged_rows) >= 4096:
                self._logged_rows.clear()
            counter = self._logged_rows[name] = PREDICTION_LOG_ROWS.labels(name)
        counter.inc(len(logits))
        return PredictionIds(prefix, len(logits))

    # ---------------------------------------------------------------------------------------- outcomes

    def _limit(self, rows: int) -> None:
        if rows > self.settings.max_outcomes_per_request:
            raise InvalidParameter(
                f"{rows} outcomes in one call; send at most {self.settings.max_outcomes_per_request} per call",
                field="labels",
            )

    def _score(self, name: str, version: int, logits: np.ndarray, labels: np.ndarray) -> stats.RowStatistics:
        view = self.calibrator_of(name, version or None)
        if view.calibrator is None:
            probabilities = workflows.calibrate(None, logits)
            return stats.row_statistics(probabilities, labels, logits=logits)
        from service.serving.dataplane import calibrate_array

        probabilities = calibrate_array(view.calibrator, logits, from_logits=True)
        return stats.row_statistics(probabilities, labels)

    def outcomes_by_id(self, name: str, ids: Sequence[Any], labels: Any) -> dict[str, Any]:
        """Labels of logged predictions, joined by id; unknown, expired or foreign ids and bad labels are
        reported per row; a repeated id counts once."""
        if not isinstance(ids, list) or not ids:
            raise InvalidInput("prediction_ids must be a non-empty list of ids", field="prediction_ids")
        self._limit(len(ids))
        if not isinstance(labels, list) or len(labels) != len(ids):
            raise InvalidInput(
                f"labels must be a list of {len(ids)} labels, one per prediction id", field="labels"
            )
        self.log.flush()
        text_ids = [item for item in ids if isinstance(item, str)]
        found = self.store.predictions(sorted(set(text_ids)))
        results: list[dict[str, Any]] = []
        by_version: dict[int, list[tuple[int, Any, int]]] = {}
        seen: set[str] = set()
        for row, (item, label) in enumerate(zip(ids, labels, strict=True)):
            result: dict[str, Any] = {"prediction_id": item}
            results.append(result)
            prediction = found.get(item) if isinstance(item, str) else None
            if prediction is None or prediction.model != name:
                result["status"] = "unknown"
                result["detail"] = (
                    f"no logged prediction of model {name!r} has this id (never issued, expired, or not logged)"
                )
                continue
            if item in seen:
                result["status"] = "repeat"
                result["detail"] = "this id appears earlier in the same call"
                continue
            k = max(prediction.logits.shape[0], 2)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k:
                result["status"] = "invalid"
                result["detail"] = f"label {label!r} must be a class index in 0..{k - 1}"
                continue
            seen.add(item)
            by_version.setdefault(prediction.version, []).append((row, prediction, label))
        outcomes: list[Outcome] = []
        for version, entries in by_version.items():
            logits = _stack([prediction.logits for _, prediction, _ in entries])
            labels_array = np.array([label for *_, label in entries])
            scored = self._score(name, version, logits, labels_array)
            for index, (_, prediction, label) in enumerate(entries):
                outcomes.append(_outcome(prediction.id, version, prediction.at, label, scored, index))
        repeats = self.store.record_outcomes(name, outcomes) if outcomes else set()
        if len(outcomes) > len(repeats):
            OUTCOMES.labels(name).inc(len(outcomes) - len(repeats))
        for result in results:
            if "status" not in result:
                result["status"] = "repeat" if result["prediction_id"] in repeats else "counted"
        return _summary(results)

    def outcomes_by_scores(
        self, name: str, logits: np.ndarray, labels: Any, version: int | None
    ) -> dict[str, Any]:
        """Labelled logits scored with calibrator ``version`` (the active one when None): a batch job that
        joined its labels itself. They are logged too (ids in the answer), so refits can use them."""
        self._limit(len(logits))
        view = self.calibrator_of(name, version)
        labels_array = check_labels(labels, len(logits), max(logits.shape[1], 2))
        scored = self._score(name, view.version, logits, labels_array)
        now = time.time()
        batch = PredictionBatch(self.prefixes.next(), name, view.version, now, logits, scored.confidence)
        ids = batch.ids()
        outcomes = [
            _outcome(ids[i], view.version, now, int(labels_array[i]), scored, i) for i in range(len(ids))
        ]
        self.store.record_outcomes(name, outcomes, logged=batch)
        OUTCOMES.labels(name).inc(len(outcomes))
        return _summary([{"prediction_id": item, "status": "counted"} for item in ids])

    # ----------------------------------------------------------------------------------------- windows

    def window_seconds(self, window: str) -> int:
        seconds = parse_duration(window)
        if seconds > min(self.max_age_s, MAX_WINDOW_S):
            raise InvalidParameter(
                f"window {window!r} is longer than the {self.settings.prediction_log_max_age} the monitoring "
                "keeps (CALIBSERVE_PREDICTION_LOG_MAX_AGE)",
                field="window",
            )
        return seconds

    def report(self, name: str, window: str, version: int | None, active: CalibratorView) -> dict[str, Any]:
        """The window's figures, label-free estimates and drift state of the outcomes of calibrator
        ``version`` (the active one, ``active``, when None)."""
        seconds = self.window_seconds(window)
        since = time.time() - seconds
        view = active if version is None else self.calibrator_of(name, version)
        sums = self.store.bin_sums(name, since, view.version)
        counts, confidence_total = self.store.confidence_counts(name, since, view.version)
        (judged,) = self._judge(
            stats.BinSums.stack([sums]), counts[None], np.array([confidence_total]), [view.document or {}]
        )
        return {
            "model": name,
            "window": window,
            "window_seconds": seconds,
            "calibrator_version": view.version or None,
            **judged,
            "figures": {**judged["figures"], "bins": sums.reliability_bins()},
        }

    def _judge(
        self,
        sums: stats.BinSums,
        counts: np.ndarray,
        confidence_totals: np.ndarray,
        documents: Sequence[Mapping[str, Any]],
    ) -> list[dict[str, Any]]:
        """Figures, label-free estimates and drift of M windows' sums (:meth:`BinSums.stack`), confidence
        histograms ``(M, CONFIDENCE_BINS)`` and confidence sums ``(M,)``, each against its calibrator's
        document: in arrays, so that a scrape judges every calibrated model at once."""
        summary = sums.summary()
        predictions = counts.sum(axis=-1)
        references = np.zeros(counts.shape)  # no fit-time histogram: an empty row, whose PSI and KS are None
        for i, document in enumerate(documents):
            reference = self._reference(document)
            if reference is not None and reference.shape == counts.shape[1:]:
                references[i] = reference
        with np.errstate(invalid="ignore", divide="ignore"):
            expected_accuracy = confidence_totals / predictions
        psi = stats.population_stability_index(references, counts)
        ks = stats.kolmogorov_smirnov(references, counts)
        judged = []
        for i, document in enumerate(documents):
            figures = {"n": int(summary["n"][i])} | {
                name: stats.number(summary[name][i]) for name in stats.BinSums.SUMMARY
            }
            label_free = {
                "predictions": int(predictions[i]),
                "expected_accuracy": stats.number(expected_accuracy[i]),
                "realised_accuracy": figures["accuracy"],
                "confidence_psi": stats.number(psi[i]),
                "confidence_ks": stats.number(ks[i]),
            }
            judged.append(
                {"figures": figures, "label_free": label_free, "drift": self.drift(figures, document)}
            )
        return judged

    def gauges(self, active_of: Callable[[str], CalibratorView | None]) -> list[tuple[str, str, str, float]]:
        """``(series, model, window, value)`` of every model with an active calibrator and data in the exported
        windows (``CALIBSERVE_MONITORING_WINDOWS``), for that calibrator (a model without one has nothing to
        be judged against: its figures are a request to ``/monitoring`` away, and thousands of them would
        swell every scrape); one query per window and table, and
        cached for :data:`GAUGES_TTL_S` (Prometheus scrapes every 15 s or so)."""
        now = time.monotonic()
        if self._gauges is not None and now - self._gauges[0] < GAUGES_TTL_S:
            return self._gauges[1]
        try:
            values = self._read_gauges(active_of)
        except Exception:  # a scrape must answer: an unreadable database costs the gauges, not /metrics
            logger.exception("monitoring gauges could not be read; /metrics answers without them")
            values = []
        self._gauges = (now, values)
        return values

    def _read_gauges(
        self, active_of: Callable[[str], CalibratorView | None]
    ) -> list[tuple[str, str, str, float]]:
        values: list[tuple[str, str, str, float]] = []
        views: dict[str, CalibratorView | None] = {}  # one lookup per model, however many windows
        for window in self.windows:
            since = time.time() - parse_duration(window)
            sums = self.store.all_bin_sums(since, calibrated_only=True)
            confidence = self.store.all_confidence_counts(since, calibrated_only=True)
            keys, documents = [], []
            for key in sorted({*sums, *confidence}):
                model, version = key
                if model not in views:
                    views[model] = active_of(model)
                view = views[model]
                if view is not None and view.version == version:  # only the active calibrator is judged
                    keys.append(key)
                    documents.append(view.document or {})
            if not keys:
                continue
            no_predictions = (np.zeros(stats.CONFIDENCE_BINS, dtype=np.int64), 0.0)
            judged = self._judge(
                stats.BinSums.stack([sums.get(key, stats.BinSums.empty()) for key in keys]),
                np.stack([confidence.get(key, no_predictions)[0] for key in keys]),
                np.array([confidence.get(key, no_predictions)[1] for key in keys]),
                documents,
            )
            for (model, _), entry in zip(keys, judged, strict=True):
                figures, label_free = entry["figures"], entry["label_free"]
                state = entry["drift"]["state"]
                series = {
                    "ece": figures["ece"],
                    "mce": figures["mce"],
                    "brier": figures["brier"],
                    "nll": figures["nll"],
                    "accuracy": figures["accuracy"],
                    "window_outcomes": figures["n"],
                    "window_predictions": label_free["predictions"],
                    "expected_accuracy": label_free["expected_accuracy"],
                    "confidence_psi": label_free["confidence_psi"],
                    "confidence_ks": label_free["confidence_ks"],
                    "drift": 1.0 if state == "drift" else 0.0,
                    "too_few_outcomes": 1.0 if state == "too_few_outcomes" else 0.0,
                }
                values += [(name, model, window, float(v)) for name, v in series.items() if v is not None]
        return values

    def _reference(self, document: Mapping[str, Any]) -> np.ndarray | None:
        """The fit-time confidence histogram of a calibrator ``document`` (None: it has none), converted once
        per document: a scrape judges every calibrated model in every window against it."""
        cached = self._references.get(id(document))
        if cached is not None and cached[0] is document:
            return cached[1]
        fit = document.get("fit") if isinstance(document.get("fit"), Mapping) else {}
        histogram = fit.get("confidence_histogram")
        reference = np.asarray(histogram, dtype=np.float64) if isinstance(histogram, list) else None
        if len(self._references) >= 4096:
            self._references.clear()
        self._references[id(document)] = (document, reference)  # holding the document keeps its id unique
        return reference

    def drift(self, figures: Mapping[str, Any], document: Mapping[str, Any]) -> dict[str, Any]:
        """``state``: ``ok``, ``drift`` (a rule breached), ``too_few_outcomes`` (fewer than the minimum), or
        ``no_baseline`` (no calibrator with fit-time figures), with one check per rule."""
        minimum = self.settings.monitoring_min_outcomes
        baseline = (document.get("fit") or {}).get("after") if document else None
        checks = [
            rule.check(figures.get(rule.metric), (baseline or {}).get(rule.metric)) for rule in self.rules
        ]
        if figures["n"] < minimum:
            state = "too_few_outcomes"
        elif not baseline:
            state = "no_baseline"
        else:
            state = "drift" if any(check["status"] == "fail" for check in checks) else "ok"
        return {"state": state, "min_outcomes": minimum, "baseline": "fit", "checks": checks}

    # ------------------------------------------------------------------------------------------ refit

    def labelled(self, name: str, window: str) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of the window's labelled predictions (any calibrator version), oldest first."""
        self.log.flush()
        seconds = self.window_seconds(window)
        logits, labels = self.store.labelled(name, time.time() - seconds)
        if not logits:
            raise NotFound(f"model {name!r} has no labelled outcomes in the last {window}")
        widths = {row.shape[0] for row in logits}
        if len(widths) != 1:
            raise InvalidInput(
                f"the outcomes of model {name!r} in the last {window} have several class counts"
            )
        return np.stack(logits), np.asarray(labels)


def _stack(rows: Sequence[np.ndarray]) -> np.ndarray:
    widths = {row.shape[0] for row in rows}
    if len(widths) != 1:
        raise InvalidInput("the predictions of one call have several class counts")
    return np.stack(rows)


def _outcome(
    prediction_id: str, version: int, at: float, label: int, scored: stats.RowStatistics, i: int
) -> Outcome:
    nll = float(scored.nll[i])
    return Outcome(
        id=prediction_id,
        version=version,
        at=at,
        label=int(label),
        bin=int(scored.bins[i]),
        confidence=float(scored.confidence[i]),
        correct=float(scored.correct[i]),
        brier=float(scored.brier[i]),
        nll=nll,  # infinite where the calibrated probability of the label is 0: the exact NLL
    )


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {status: 0 for status in ("counted", "repeat", "unknown", "invalid")}
    for result in results:
        counts[result["status"]] += 1
    return {**counts, "results": results}
