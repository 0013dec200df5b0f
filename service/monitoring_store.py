"""The monitoring database: the prediction log, labelled outcomes, and per-minute mergeable bin sums.

SQLite in WAL mode (the default, ``<store>/monitoring.sqlite3``, shared by every worker on the volume) or
PostgreSQL (``CALIBSERVE_DATABASE_URL=postgresql://...``, shared by replicas on several hosts). Both hold:

``predictions``
    One row per served row that was logged: id, model, calibrator version (0: none), time, the model's
    logits (float64 up to :data:`FLOAT64_MAX_COLUMNS` columns, float32 beyond: about 4 bytes a class), so
    that an outcome can be scored with the calibrator that answered, and a refit can start from logits.
``outcomes``
    One row per labelled prediction id: the primary key makes a repeated id count once, whichever worker or
    replica receives it, and the transaction that inserts it adds it to ``bins``.
``bins``
    Per model, calibrator version, minute and top-label bin: the sums of :class:`~service.core.monitoring.BinSums`.
``confidence``
    Per model, version, minute and confidence bin: the count and confidence sum of every logged prediction
    (labelled or not), for the label-free figures.

Windows sum bins over minutes, so a query reads at most ``minutes x bins`` rows, however many predictions
there were. Outcomes commit (durably: ``synchronous=FULL``) before they are acknowledged; the prediction log
is written by the service's background writer in group commits.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.monitoring import CONFIDENCE_BINS, N_BINS, BinSums, confidence_bins
from service.errors import StoreUnavailable

FLOAT64_MAX_COLUMNS = 64
BIN_SUMS = (
    "n BIGINT NOT NULL, confidence DOUBLE PRECISION NOT NULL, correct DOUBLE PRECISION NOT NULL, "
    "brier DOUBLE PRECISION NOT NULL, nll DOUBLE PRECISION NOT NULL"
)
CONFIDENCE_SUMS = "n BIGINT NOT NULL, total DOUBLE PRECISION NOT NULL"


def _sums_table(table: str, time_column: str, sums: str) -> str:
    """A table of sums per model, calibrator version, time (minute or hour) and bin."""
    return (
        f"CREATE TABLE IF NOT EXISTS {table} (model TEXT NOT NULL, version INTEGER NOT NULL, "
        f"{time_column} BIGINT NOT NULL, bin INTEGER NOT NULL, {sums}, "
        f"PRIMARY KEY (model, version, {time_column}, bin))"
    )


SCHEMA = (
    """CREATE TABLE IF NOT EXISTS predictions (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL,
        columns INTEGER NOT NULL, wide INTEGER NOT NULL, scores BYTEA NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS predictions_at ON predictions (at)",
    """CREATE TABLE IF NOT EXISTS outcomes (
        id TEXT PRIMARY KEY, model TEXT NOT NULL, label INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS outcomes_model_at ON outcomes (model, at)",
    # per minute, and the same sums per hour: a long window reads its full hours per hour, its ends per minute
    _sums_table("bins", "minute", BIN_SUMS),
    _sums_table("confidence", "minute", CONFIDENCE_SUMS),
    _sums_table("bins_hourly", "hour", BIN_SUMS),
    _sums_table("confidence_hourly", "hour", CONFIDENCE_SUMS),
)
BIN_UPSERT = """INSERT INTO {table} (model, version, {time}, bin, n, confidence, correct, brier, nll)
    VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})
    ON CONFLICT (model, version, {time}, bin) DO UPDATE SET n = {table}.n + excluded.n,
    confidence = {table}.confidence + excluded.confidence, correct = {table}.correct + excluded.correct,
    brier = {table}.brier + excluded.brier, nll = {table}.nll + excluded.nll"""
PREDICTION_INSERT = """INSERT INTO predictions (id, model, version, at, columns, wide, scores)
    VALUES {values} ON CONFLICT (id) DO NOTHING"""
# Rows per INSERT of the prediction log: one statement per 256 rows rather than one step per row, because
# sqlite3 gives up the GIL around every step, and a writer thread taking it back row by row made the serving
# thread hand it over hundreds of times per group commit (bench/bench_monitoring.py, section 2). 256 x 7
# parameters stay under SQLite's and PostgreSQL's limits.
PREDICTION_INSERT_ROWS = 256
CONFIDENCE_UPSERT = """INSERT INTO {table} (model, version, {time}, bin, n, total)
    VALUES ({p}, {p}, {p}, {p}, {p}, {p})
    ON CONFLICT (model, version, {time}, bin) DO UPDATE SET n = {table}.n + excluded.n,
    total = {table}.total + excluded.total"""
# (table, time column) of each granularity of the two kinds of sums
GRANULARITIES = {
    "bins": (("bins", "minute"), ("bins_hourly", "hour")),
    "confidence": (("confidence", "minute"), ("confidence_hourly", "hour")),
}
BIN_FIELDS = BinSums.FIELDS  # the columns of the bins tables, in BinSums' order
CONFIDENCE_FIELDS = ("n", "total")


def _confidence(sums: np.ndarray) -> tuple[np.ndarray, float]:
    """``(counts per bin, sum of confidences)`` of a confidence table's summed rows."""
    return np.rint(sums[0]).astype(np.int64), float(sums[1].sum())


def _hourly(rows: list[tuple]) -> list[tuple]:
    """Per-minute rows ``(model, version, minute, bin, *sums)`` summed per hour, sorted by key."""
    sums: dict[tuple, list[float]] = {}
    for model, version, minute, bin_id, *values in rows:
        entry = sums.setdefault((model, version, minute // 60, bin_id), [0] * len(values))
        for i, value in enumerate(values):
            entry[i] += value
    return [(*key, *values) for key, values in sorted(sums.items())]


def window_spans(since: float, now: float | None = None) -> list[tuple[int, int, int | None]]:
    """``(granularity, first, end)`` pieces covering the minutes from ``since`` on: per-minute rows up to the
    first full hour, per-hour rows for the full hours before the current one, per-minute rows from the current
    hour on (granularity 0: minutes, 1: hours; ``end`` exclusive, None: open)."""
    first_minute = minute_of(since)
    current_hour = minute_of(time.time() if now is None else now) // 60
    first_full_hour = -(-first_minute // 60)
    if first_full_hour >= current_hour:
        return [(0, first_minute, None)]
    return [
        (0, first_minute, first_full_hour * 60),
        (1, first_full_hour, current_hour),
        (0, current_hour * 60, None),
    ]


@dataclass(frozen=True, slots=True)
class PredictionBatch:
    """The rows of one answer to log: ids ``<prefix>.<row>``, model, calibrator version (0: none), time,
    logits ``(N, K)`` and top-label confidences ``(N,)``."""

    prefix: str
    model: str
    version: int
    at: float
    logits: np.ndarray
    confidence: np.ndarray

    def ids(self) -> list[str]:
        return [f"{self.prefix}.{row}" for row in range(len(self.logits))]

    def rows(self) -> list[tuple]:
        columns, wide, data = encode_logits(self.logits)
        if len(self.logits) == 1:  # most answers: one row
            return [(f"{self.prefix}.0", self.model, self.version, self.at, columns, wide, data)]
        width = len(data) // max(len(self.logits), 1)
        return [
            (row_id, self.model, self.version, self.at, columns, wide, data[i * width : (i + 1) * width])
            for i, row_id in enumerate(self.ids())
        ]


@dataclass(frozen=True, slots=True)
class StoredPrediction:
    id: str
    model: str
    version: int
    at: float
    logits: np.ndarray


@dataclass(frozen=True, slots=True)
class Outcome:
    """A labelled prediction's figures, to add to the bins: id, version, time, label, and its bin sums."""

    id: str
    version: int
    at: float
    label: int
    bin: int
    confidence: float
    correct: float
    brier: float
    nll: float


def encode_logits(logits: np.ndarray) -> tuple[int, int, bytes]:
    """``(columns, wide, bytes)`` of ``(N, K)`` logits: float64 up to :data:`FLOAT64_MAX_COLUMNS` columns,
    float32 beyond."""
    wide = logits.shape[-1] <= FLOAT64_MAX_COLUMNS
    data = np.ascontiguousarray(logits, dtype="<f8" if wide else "<f4").tobytes()
    return logits.shape[-1], int(wide), data


def decode_logits(columns: int, wide: int, data: bytes) -> np.ndarray:
    """One row's logits, as float64."""
    return np.frombuffer(data, dtype="<f8" if wide else "<f4").astype(np.float64).reshape(columns)


def minute_of(at: float) -> int:
    return int(at // 60)


def _aggregate_bins(model: str, outcomes: Iterable[Outcome]) -> list[tuple]:
    """Bin rows to upsert, in key order (so are the histogram rows): concurrent PostgreSQL transactions then
    lock rows in one order, and cannot deadlock each other."""
    sums: dict[tuple[int, int, int], list[float]] = {}
    for item in outcomes:
        key = (item.version, minute_of(item.at), item.bin)
        entry = sums.setdefault(key, [0, 0.0, 0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += item.confidence
        entry[2] += item.correct
        entry[3] += item.brier
        entry[4] += item.nll
    return sorted((model, *key, *values) for key, values in sums.items())


def _aggregate_confidence(batches: Sequence[PredictionBatch]) -> list[tuple]:
    """The confidence histogram's additions of a group of answers: one bincount per model, version and minute
    (not per answer: most answers are a row or two), rows sorted by key (concurrent writers lock rows in
    one order)."""
    groups: dict[tuple[str, int, int], list[np.ndarray]] = {}
    for batch in batches:
        groups.setdefault((batch.model, batch.version, minute_of(batch.at)), []).append(batch.confidence)
    rows = []
    for key in sorted(groups):
        confidence = np.concatenate(groups[key])
        bins = confidence_bins(confidence)
        counts = np.bincount(bins, minlength=CONFIDENCE_BINS)
        totals = np.bincount(bins, weights=confidence, minlength=CONFIDENCE_BINS)
        rows += [
            (*key, bin_id, int(counts[bin_id]), float(totals[bin_id]))
            for bin_id in np.flatnonzero(counts).tolist()
        ]
    return rows


class MonitoringStore:
    """The SQL of the monitoring database, over a DB-API connection per thread (see the subclasses)."""

    placeholder = "?"

    def _connect(self) -> Any:
        raise NotImplementedError

    def __init__(self) -> None:
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._insert_statements: dict[int, str] = {}  # rows: the INSERT of that many log rows

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            with self._schema_lock:
                if not self._schema_ready:
                    self._create_schema(connection)
                    self._schema_ready = True
        return connection

    def _create_schema(self, connection: Any) -> None:
        with self._transaction(connection) as cursor:
            for statement in SCHEMA:
                cursor.execute(self._dialect(statement))

    def _dialect(self, statement: str) -> str:
        return statement

    def _transaction(self, connection: Any) -> Any:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return self._dialect(statement.replace("{p}", self.placeholder))

    def _prediction_insert(self, rows: int) -> str:
        statement = self._insert_statements.get(rows)
        if statement is None:
            row = "(" + ", ".join([self.placeholder] * 7) + ")"
            statement = self._dialect(PREDICTION_INSERT.replace("{values}", ", ".join([row] * rows)))
            if len(self._insert_statements) >= 64:
                self._insert_statements.clear()
            self._insert_statements[rows] = statement
        return statement

    def _insert_predictions(self, cursor: Any, rows: list[tuple]) -> None:
        """Insert logged rows (an id already logged is left as it is), :data:`PREDICTION_INSERT_ROWS` a
        statement."""
        for start in range(0, len(rows), PREDICTION_INSERT_ROWS):
            part = rows[start : start + PREDICTION_INSERT_ROWS]
            cursor.execute(self._prediction_insert(len(part)), [value for row in part for value in row])

    # ---------------------------------------------------------------------------------------- writes

    def log_predictions(self, batches: Sequence[PredictionBatch]) -> None:
        """Log predictions and add them to the confidence histogram, in one transaction."""
        if not batches:
            return
        with self._transaction(self._connection()) as cursor:
            self._insert_predictions(cursor, [row for batch in batches for row in batch.rows()])
            self._upsert(cursor, "confidence", _aggregate_confidence(batches))

    def _upsert(self, cursor: Any, kind: str, rows: list[tuple]) -> None:
        """Add per-minute ``rows`` of sums to the minute table and the hour table of ``kind``."""
        template = BIN_UPSERT if kind == "bins" else CONFIDENCE_UPSERT
        (minute_table, minute_column), (hour_table, hour_column) = GRANULARITIES[kind]
        for table, column, values in (
            (minute_table, minute_column, rows),
            (hour_table, hour_column, _hourly(rows)),
        ):
            statement = template.replace("{table}", table).replace("{time}", column)
            cursor.executemany(self._sql(statement), values)

    def predictions(self, ids: Sequence[str]) -> dict[str, StoredPrediction]:
        """The logged predictions among ``ids``."""
        found: dict[str, StoredPrediction] = {}
        connection = self._connection()
        with self._transaction(connection, write=False) as cursor:
            for start in range(0, len(ids), 500):
                part = list(ids[start : start + 500])
                marks = ", ".join([self.placeholder] * len(part))
                cursor.execute(
                    f"SELECT id, model, version, at, columns, wide, scores FROM predictions WHERE id IN ({marks})",
                    part,
                )
                for row_id, model, version, at, columns, wide, data in cursor.fetchall():
                    logits = decode_logits(columns, wide, bytes(data))
                    found[row_id] = StoredPrediction(row_id, model, version, at, logits)
        return found

    def record_outcomes(
        self, model: str, outcomes: Sequence[Outcome], *, logged: PredictionBatch | None = None
    ) -> set[str]:
        """Add outcomes to the bins, each id once, in one durable transaction; ``logged``: their predictions
        to log with them (outcomes that came with their logits). Returns the ids that were already recorded
        (repeats, not counted again)."""
        with self._transaction(self._connection(), durable=True) as cursor:
            if logged is not None:
                self._insert_predictions(cursor, logged.rows())
            fresh = self._insert_outcomes(cursor, model, outcomes)
            counted: dict[str, Outcome] = {}  # an id given twice in one call counts once: its first entry
            for item in outcomes:
                if item.id in fresh:
                    counted.setdefault(item.id, item)
            self._upsert(cursor, "bins", _aggregate_bins(model, counted.values()))
        return {item.id for item in outcomes} - fresh

    def _insert_outcomes(self, cursor: Any, model: str, outcomes: Sequence[Outcome]) -> set[str]:
        """Insert the outcome ids that are not recorded yet (an id given twice: its first entry); the ids
        inserted."""
        fresh = set()
        statement = self._sql(
            "INSERT INTO outcomes (id, model, label, at) VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (id) DO NOTHING"
        )
        for item in outcomes:
            cursor.execute(statement, (item.id, model, item.label, time.time()))
            if cursor.rowcount == 1:
                fresh.add(item.id)
        return fresh

    # ----------------------------------------------------------------------------------------- reads

    def _window_sums(
        self,
        kind: str,
        since: float,
        *,
        model: str | None = None,
        version: int | None = None,
        calibrated_only: bool = False,
    ) -> dict[tuple[str, int], np.ndarray]:
        """``{(model, version): sums}`` of ``kind`` over the window from ``since``, ``sums`` an array of one row
        per field (:data:`BIN_FIELDS` or :data:`CONFIDENCE_FIELDS`) and one column per bin.

        The window's pieces (:func:`window_spans`: minute rows at its ends, hour rows between) are read in one
        statement and summed in SQL, so a scrape of every model costs one query per window and table, and
        the rows become arrays without a Python loop per value. ``calibrated_only`` leaves out predictions
        made without a calibrator (version 0), which nothing is judged against.
        """
        fields = BIN_FIELDS if kind == "bins" else CONFIDENCE_FIELDS
        n_bins = N_BINS if kind == "bins" else CONFIDENCE_BINS
        pieces: list[str] = []
        parameters: list[Any] = []
        for granularity, first, end in window_spans(since):
            table, column = GRANULARITIES[kind][granularity]
            conditions = [f"{column} >= {{p}}"]
            parameters.append(first)
            if end is not None:
                conditions.append(f"{column} < {{p}}")
                parameters.append(end)
            if model is not None:
                conditions.append("model = {p}")
                parameters.append(model)
            if version is not None:
                conditions.append("version = {p}")
                parameters.append(version)
            if calibrated_only:
                conditions.append("version > 0")
            pieces.append(
                f"SELECT model, version, bin, {', '.join(fields)} FROM {table} WHERE {' AND '.join(conditions)}"
            )
        sums = ", ".join(f"SUM({field})" for field in fields)
        query = (
            f"SELECT model, version, bin, {sums} FROM ({' UNION ALL '.join(pieces)}) AS pieces "
            "GROUP BY model, version, bin"
        )
        with self._transaction(self._connection(), write=False) as cursor:
            cursor.execute(self._sql(query), parameters)
            rows = cursor.fetchall()
        keys: dict[tuple[str, int], int] = {}
        slots = np.fromiter(
            (keys.setdefault((row[0], int(row[1])), len(keys)) for row in rows),
            dtype=np.intp,
            count=len(rows),
        )
        bins = np.fromiter((row[2] for row in rows), dtype=np.intp, count=len(rows))
        values = np.array([row[3:] for row in rows], dtype=np.float64).reshape(len(rows), len(fields))
        table = np.zeros((len(keys), len(fields), n_bins))
        table[slots, :, bins] = values  # GROUP BY made (slot, bin) unique
        return {key: table[slot] for key, slot in keys.items()}

    def bin_sums(self, model: str, since: float, version: int | None) -> BinSums:
        """The bin sums of ``model``'s outcomes of predictions made since ``since`` (all versions: None)."""
        found = self._window_sums("bins", since, model=model, version=version)
        return BinSums(*sum(found.values(), np.zeros((len(BIN_FIELDS), N_BINS))))

    def confidence_counts(self, model: str, since: float, version: int | None) -> tuple[np.ndarray, float]:
        """``(counts per confidence bin, sum of confidences)`` of predictions logged since ``since``."""
        found = self._window_sums("confidence", since, model=model, version=version)
        return _confidence(sum(found.values(), np.zeros((len(CONFIDENCE_FIELDS), CONFIDENCE_BINS))))

    def all_bin_sums(self, since: float, *, calibrated_only: bool = False) -> dict[tuple[str, int], BinSums]:
        """:meth:`bin_sums` of every model and version with outcomes since ``since`` (with a calibrator only:
        ``calibrated_only``)."""
        found = self._window_sums("bins", since, calibrated_only=calibrated_only)
        return {key: BinSums(*sums) for key, sums in found.items()}

    def all_confidence_counts(
        self, since: float, *, calibrated_only: bool = False
    ) -> dict[tuple[str, int], tuple[np.ndarray, float]]:
        """:meth:`confidence_counts` of every model and version with predictions since ``since``."""
        found = self._window_sums("confidence", since, calibrated_only=calibrated_only)
        return {key: _confidence(sums) for key, sums in found.items()}

    def labelled(self, model: str, since: float) -> tuple[list[np.ndarray], list[int]]:
        """Logits and labels of ``model``'s labelled predictions made since ``since``, oldest first."""
        query = (
            "SELECT p.columns, p.wide, p.scores, o.label FROM predictions p JOIN outcomes o ON o.id = p.id "
            "WHERE p.model = {p} AND p.at >= {p} ORDER BY p.at, p.id"
        )
        with self._transaction(self._connection(), write=False) as cursor:
            cursor.execute(self._sql(query), (model, since))
            rows = cursor.fetchall()
        return [decode_logits(c, w, bytes(d)) for c, w, d, _ in rows], [int(label) for *_, label in rows]

    def models_since(self, since: float) -> list[str]:
        """Models with logged predictions or outcomes since ``since``."""
        minute = minute_of(since)
        with self._transaction(self._connection(), write=False) as cursor:
            cursor.execute(
                self._sql(
                    "SELECT DISTINCT model FROM confidence WHERE minute >= {p} "
                    "UNION SELECT DISTINCT model FROM bins WHERE minute >= {p}"
                ),
                (minute, minute),
            )
            return sorted(row[0] for row in cursor.fetchall())

    # ------------------------------------------------------------------------------------- retention

    def prune(self, *, older_than: float, max_rows: int) -> int:
        """Drop predictions (and bins, histograms, outcome ids) older than ``older_than``, and the oldest
        predictions beyond ``max_rows``; the number of predictions dropped."""
        minute = minute_of(older_than)
        with self._transaction(self._connection()) as cursor:
            cursor.execute(self._sql("DELETE FROM predictions WHERE at < {p}"), (older_than,))
            dropped = max(cursor.rowcount, 0)
            cursor.execute(self._sql("DELETE FROM outcomes WHERE at < {p}"), (older_than,))
            cursor.execute(self._sql("DELETE FROM bins WHERE minute < {p}"), (minute,))
            cursor.execute(self._sql("DELETE FROM confidence WHERE minute < {p}"), (minute,))
            # an hour partly older than the retention goes whole: a window never reaches back that far
            cursor.execute(self._sql("DELETE FROM bins_hourly WHERE hour < {p}"), (minute // 60,))
            cursor.execute(self._sql("DELETE FROM confidence_hourly WHERE hour < {p}"), (minute // 60,))
            cursor.execute("SELECT COUNT(*) FROM predictions")
            excess = int(cursor.fetchone()[0]) - max_rows
            if excess > 0:
                cursor.execute(
                    self._sql(
                        "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions ORDER BY at LIMIT {p})"
                    ),
                    (excess,),
                )
                dropped += excess
        return dropped

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class _SQLiteTransaction:
    def __init__(self, connection: sqlite3.Connection, *, write: bool, durable: bool) -> None:
        self.connection, self.write, self.durable = connection, write, durable

    def __enter__(self) -> sqlite3.Cursor:
        self.cursor = self.connection.cursor()
        if self.durable:
            self.cursor.execute("PRAGMA synchronous=FULL")
        self.cursor.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        return self.cursor

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            self.cursor.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            if self.durable:
                self.cursor.execute("PRAGMA synchronous=NORMAL")
            self.cursor.close()


SQLITE_BUSY_TIMEOUT_S = 30.0
WAL_RETRY_PAUSE_S = 0.005


def _switch_to_wal(connection: sqlite3.Connection, *, deadline: float) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while the file is busy, until ``deadline``.

    Switching a new file to WAL takes its exclusive lock. When several connections (workers, threads) open a
    new file at once, each holds a shared lock and asks for the exclusive one; SQLite then answers
    ``SQLITE_BUSY`` at once, without waiting in the busy handler, since waiting could deadlock. The loser
    retries here once the winner has switched the file (then the pragma finds WAL and needs no lock).
    """
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_PAUSE_S)


class SQLiteMonitoringStore(MonitoringStore):
    """``path`` (one file, WAL mode), shared by the workers of one host."""

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        connection = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
            _switch_to_wal(connection, deadline=time.monotonic() + SQLITE_BUSY_TIMEOUT_S)
            # NORMAL in WAL mode: a commit survives the process being killed (it is in the WAL file); outcome
            # transactions switch to FULL, which also survives the machine losing power.
            connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            if connection is not None:
                connection.close()
            raise StoreUnavailable(f"the monitoring database {self.path} cannot be opened: {exc}") from None
        return connection

    def _dialect(self, statement: str) -> str:
        return statement.replace("BYTEA", "BLOB").replace("DOUBLE PRECISION", "REAL")

    def _transaction(
        self, connection: Any, *, write: bool = True, durable: bool = False
    ) -> _SQLiteTransaction:
        return _SQLiteTransaction(connection, write=write, durable=durable)
