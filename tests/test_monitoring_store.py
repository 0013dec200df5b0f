"""The monitoring database (service/monitoring_store.py, service/monitoring_postgres.py), each test against both
backends: SQLite (a file in tmp_path) and PostgreSQL (a database of its own on the session's real server,
tests/helpers/postgres.py; skipped through require_or_skip where PostgreSQL cannot run).

What is checked: logits come back as logged (float64 up to 64 columns, float32 beyond); an outcome id counts
once, however often and by however many threads or processes it is posted at once; the bin and confidence
sums are those of :class:`~service.core.monitoring.BinSums` over the same rows, per minute and version;
``labelled()`` joins; pruning by age and row count; an acknowledged outcome survives the writer being
SIGKILLed (SQLite) and the server crashing (PostgreSQL); a PostgreSQL outage is StoreUnavailable without the
password, and the store carries on when the server is back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.config import Settings
from service.core.monitoring import (
    CONFIDENCE_BINS,
    N_BINS,
    BinSums,
    RowStatistics,
    confidence_histogram,
    row_statistics,
)
from service.errors import InvalidInput, StoreUnavailable
from service.monitoring_store import (
    FLOAT64_MAX_COLUMNS,
    MonitoringStore,
    Outcome,
    PredictionBatch,
    SQLiteMonitoringStore,
    minute_of,
    window_spans,
)
from service.serving.monitoring import open_store
from tests.helpers.data import REPO
from tests.helpers.postgres import PostgresServer
from tests.helpers.requirements import require_or_skip

# A minute boundary: prediction times are T0 + whole minutes + seconds.
T0 = 1_700_000_040.0
assert T0 % 60 == 0


# ---------------------------------------------------------------------------------------------- backends


@dataclass
class Database:
    """One monitoring database of a backend: ``open()`` gives a store on it (another worker, replica or a
    restart), closed at the end of the test."""

    backend: str
    location: str  # the SQLite file, or the PostgreSQL URL
    stores: list[MonitoringStore] = field(default_factory=list)

    def open(self) -> MonitoringStore:
        if self.backend == "sqlite":
            store: MonitoringStore = SQLiteMonitoringStore(self.location)
        else:
            from service.monitoring_postgres import PostgresMonitoringStore

            store = PostgresMonitoringStore(self.location)
        self.stores.append(store)
        return store

    def close(self) -> None:
        for store in self.stores:
            store.close()


def open_location(location: str) -> MonitoringStore:
    """A store on ``location`` (a PostgreSQL URL, else an SQLite file): what the subprocesses open."""
    if location.startswith("postgresql://"):
        from service.monitoring_postgres import PostgresMonitoringStore

        return PostgresMonitoringStore(location)
    return SQLiteMonitoringStore(location)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path) -> Iterator[Database]:
    if request.param == "sqlite":
        found = Database("sqlite", str(tmp_path / "monitoring.sqlite3"))
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        found = Database("postgres", server.create_database())
    yield found
    found.close()


@pytest.fixture
def store(database: Database) -> MonitoringStore:
    return database.open()


def scalar(store: MonitoringStore, query: str) -> int:
    """One number from the store's own connection (a count of rows, to look under the API)."""
    with store._transaction(store._connection(), write=False) as cursor:
        cursor.execute(query)
        return int(cursor.fetchone()[0])


# ------------------------------------------------------------------------------------------------- data


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def scored(rng: np.random.Generator, n: int, k: int) -> RowStatistics:
    logits = rng.normal(size=(n, k)) * 2.5
    return row_statistics(softmax(logits), rng.integers(0, k, n), logits=logits)


def subset(rows: RowStatistics, mask: np.ndarray) -> RowStatistics:
    return RowStatistics(*(getattr(rows, item.name)[mask] for item in dataclasses.fields(rows)))


def outcomes_of(
    rows: RowStatistics, ids: Sequence[str], versions: np.ndarray, ats: np.ndarray
) -> list[Outcome]:
    return [
        Outcome(
            id=ids[i],
            version=int(versions[i]),
            at=float(ats[i]),
            label=int(rows.correct[i]),  # not read back by the sums; any label
            bin=int(rows.bins[i]),
            confidence=float(rows.confidence[i]),
            correct=float(rows.correct[i]),
            brier=float(rows.brier[i]),
            nll=float(rows.nll[i]),
        )
        for i in range(len(ids))
    ]


def outcome_of(number: int) -> Outcome:
    """A deterministic outcome for id ``o<number>``: two versions, five minutes, every bin (the concurrency
    tests' threads and processes post these)."""
    confidence = 0.5 + (number * 37 % 50) / 100
    correct = float(number % 3 != 0)
    return Outcome(
        id=f"o{number}",
        version=1 + number % 2,
        at=T0 + 60 * (number % 5) + number % 60,
        label=number % 10,
        bin=number % N_BINS,
        confidence=confidence,
        correct=correct,
        brier=(1 - confidence) ** 2 + (number % 7) / 100,
        nll=-np.log(confidence) + number % 4,
    )


def expected_sums(outcomes: Sequence[Outcome]) -> dict[int, BinSums]:
    """Bin sums per version of ``outcomes`` (each once)."""
    found: dict[int, BinSums] = {}
    for item in outcomes:
        sums = found.setdefault(item.version, BinSums.empty(N_BINS))
        for name in BinSums.FIELDS:
            getattr(sums, name)[item.bin] += 1.0 if name == "n" else getattr(item, name)
    return found


def histogram(confidence: np.ndarray) -> np.ndarray:
    # confidence_histogram() of no values fails (service.core.metrics._width_bin_ids: a zero range step)
    return confidence_histogram(confidence) if len(confidence) else np.zeros(CONFIDENCE_BINS, dtype=np.int64)


def assert_sums_equal(actual: BinSums, expected: BinSums) -> None:
    np.testing.assert_array_equal(actual.n, expected.n)
    for name in BinSums.FIELDS[1:]:
        np.testing.assert_allclose(getattr(actual, name), getattr(expected, name), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("columns", [2, 10, FLOAT64_MAX_COLUMNS, FLOAT64_MAX_COLUMNS + 1, 1000])
def test_logged_logits_come_back_float64_up_to_64_columns_float32_beyond(store, columns):
    rng = np.random.default_rng(columns)
    rows = 1200 if columns <= 10 else 40  # 1200: more ids than one IN (...) query takes (500)
    logits = rng.normal(size=(rows, columns)) * 10
    batch = PredictionBatch("p", "model", 3, T0 + 12.5, logits, np.full(rows, 0.5))
    other = PredictionBatch("q", "other", 0, T0, logits[:2], np.full(2, 0.5))
    store.log_predictions([batch, other])
    found = store.predictions([*batch.ids(), "never.0", "q.1"])
    assert set(found) == {*batch.ids(), "q.1"}
    stored = np.stack([found[row_id].logits for row_id in batch.ids()])
    assert stored.dtype == np.float64
    if columns <= FLOAT64_MAX_COLUMNS:
        np.testing.assert_array_equal(stored, logits)
    else:
        np.testing.assert_array_equal(stored, logits.astype(np.float32).astype(np.float64))
        assert not np.array_equal(stored, logits)
    first = found["p.0"]
    assert (first.id, first.model, first.version, first.at) == ("p.0", "model", 3, T0 + 12.5)
    assert (found["q.1"].model, found["q.1"].version) == ("other", 0)
    assert store.predictions([]) == {}


def test_a_logged_id_is_kept_as_first_written_across_and_within_statements(store):
    rows = 300  # more than one INSERT of the log takes (PREDICTION_INSERT_ROWS)
    logits = np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)
    first = PredictionBatch("a", "m", 1, T0, logits, np.full(rows, 0.5))
    store.log_predictions([first])
    again = PredictionBatch("a", "m", 2, T0 + 60, logits + 1, np.full(rows, 0.5))
    store.log_predictions([again, PredictionBatch("b", "m", 1, T0, logits[:1], np.full(1, 0.5)), again])
    found = store.predictions([*first.ids(), "b.0"])
    assert len(found) == rows + 1
    assert all(found[row_id].version == 1 for row_id in first.ids())
    np.testing.assert_array_equal(np.stack([found[row_id].logits for row_id in first.ids()]), logits)


def test_id_prefixes_are_unique_across_threads_and_processes_and_grow_within_one():
    from service.serving.monitoring import IdPrefixes

    prefixes = IdPrefixes()
    with ThreadPoolExecutor(8) as pool:
        drawn = list(pool.map(lambda _: prefixes.next(), range(20_000)))
    assert len(set(drawn)) == len(drawn)
    assert sorted(drawn) == sorted(drawn, key=lambda prefix: int(prefix[12:], 16))  # a counter per process
    other = IdPrefixes()  # another worker: another random part
    assert other.next()[:12] != prefixes.next()[:12]
    assert all(len(prefix) == 20 for prefix in drawn)


# -------------------------------------------------------------------------------------------- outcomes


def test_an_outcome_counts_once_and_a_repeat_is_returned(store):
    first = [outcome_of(i) for i in range(6)]
    assert store.record_outcomes("m", first) == set()
    again = [outcome_of(4), outcome_of(5), outcome_of(6), outcome_of(7)]
    assert store.record_outcomes("m", again) == {"o4", "o5"}
    # an id twice in one call counts once (its first entry); not a repeat of an earlier call
    doubled = [outcome_of(8), dataclasses.replace(outcome_of(8), bin=0, confidence=0.99), outcome_of(9)]
    assert store.record_outcomes("m", doubled) == set()
    assert store.record_outcomes("m", []) == set()
    assert store.record_outcomes("m", [outcome_of(i) for i in range(10)]) == {f"o{i}" for i in range(10)}
    assert scalar(store, "SELECT COUNT(*) FROM outcomes") == 10
    sums = expected_sums([outcome_of(i) for i in range(10)])
    for version in (1, 2):
        assert_sums_equal(store.bin_sums("m", T0, version), sums[version])
    assert store.bin_sums("m", T0, None).total == 10
    assert store.bin_sums("other", T0, None).total == 0


def test_an_infinite_nll_is_stored_and_summed(store):
    # the exact NLL of a label the calibrator gave probability 0
    item = dataclasses.replace(outcome_of(1), nll=float("inf"))
    store.record_outcomes("m", [item, outcome_of(3)])
    sums = store.bin_sums("m", T0, 2)
    assert np.isinf(sums.nll[item.bin]) and sums.total == 2


def test_outcomes_logged_with_their_predictions_are_joined_by_labelled(store):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3))
    batch = PredictionBatch("s", "m", 2, T0 + 61, logits, np.full(4, 0.6))
    items = [
        dataclasses.replace(outcome_of(i), id=row_id, label=i % 3) for i, row_id in enumerate(batch.ids())
    ]
    assert store.record_outcomes("m", items, logged=batch) == set()
    assert set(store.predictions(batch.ids())) == set(batch.ids())
    stored, labels = store.labelled("m", T0)
    np.testing.assert_array_equal(np.stack(stored), logits)
    assert labels == [0, 1, 2, 0]


# ------------------------------------------------------------------------------------------ bin sums


def test_bin_sums_are_those_of_the_rows_per_minute_and_version(store):
    rng = np.random.default_rng(7)
    n = 900
    rows = scored(rng, n, 6)
    minutes = rng.integers(0, 10, n)
    ats = T0 + minutes * 60 + rng.uniform(0, 59.9, n)
    versions = rng.integers(1, 3, n)
    models = np.where(rng.random(n) < 0.8, "a", "b")
    ids = [f"r{i}" for i in range(n)]
    outcomes = outcomes_of(rows, ids, versions, ats)
    for model in ("a", "b"):
        chosen = [item for item, owner in zip(outcomes, models, strict=True) if owner == model]
        for start in range(0, len(chosen), 250):  # several calls
            assert store.record_outcomes(model, chosen[start : start + 250]) == set()
    for since in (T0, T0 + 4 * 60 + 30, T0 + 9 * 60 + 59, T0 + 10 * 60):
        # a window starts at the minute of `since`: the whole of that minute is in
        in_window = minutes >= minute_of(since) - minute_of(T0)
        for model in ("a", "b"):
            for version in (None, 1, 2):
                mask = in_window & (models == model) & (version is None or versions == version)
                assert_sums_equal(store.bin_sums(model, since, version), BinSums.of_rows(subset(rows, mask)))
        every = store.all_bin_sums(since)
        expected_keys = {
            (model, version)
            for model in ("a", "b")
            for version in (1, 2)
            if (in_window & (models == model) & (versions == version)).any()
        }
        assert set(every) == expected_keys
        for (model, version), sums in every.items():
            mask = in_window & (models == model) & (versions == version)
            assert_sums_equal(sums, BinSums.of_rows(subset(rows, mask)))
    assert store.models_since(T0) == ["a", "b"]
    assert store.models_since(T0 + 10 * 60) == []


def test_confidence_counts_are_the_histogram_of_logged_predictions(store):
    rng = np.random.default_rng(11)
    batches, confidences, minutes, versions, models = [], [], [], [], []
    for i in range(30):
        rows = int(rng.integers(1, 80))
        confidence = rng.uniform(0.1, 1.0, rows)
        confidence[0] = 1.0  # the top bin's upper edge
        minute, version, model = int(rng.integers(0, 6)), int(rng.integers(0, 3)), "ab"[i % 2]
        at = T0 + 60 * minute + float(rng.uniform(0, 59))
        batches.append(PredictionBatch(f"b{i}", model, version, at, rng.normal(size=(rows, 4)), confidence))
        confidences.append(confidence)
        minutes += [minute] * rows
        versions += [version] * rows
        models += [model] * rows
    store.log_predictions(batches[:10])
    store.log_predictions(batches[10:])
    confidence = np.concatenate(confidences)
    minutes, versions, models = np.array(minutes), np.array(versions), np.array(models)
    for since in (T0, T0 + 2 * 60 + 1, T0 + 6 * 60):
        in_window = minutes >= minute_of(since) - minute_of(T0)
        for model in "ab":
            for version in (None, 0, 1, 2):
                mask = in_window & (models == model) & (version is None or versions == version)
                counts, total = store.confidence_counts(model, since, version)
                np.testing.assert_array_equal(counts, histogram(confidence[mask]))
                assert total == pytest.approx(confidence[mask].sum(), rel=1e-12, abs=1e-12)
        every = store.all_confidence_counts(since)
        for model in "ab":
            for version in (0, 1, 2):
                mask = in_window & (models == model) & (versions == version)
                if not mask.any():
                    assert (model, version) not in every
                    continue
                counts, total = every[(model, version)]
                assert counts.shape == (CONFIDENCE_BINS,)
                np.testing.assert_array_equal(counts, histogram(confidence[mask]))
                assert total == pytest.approx(confidence[mask].sum(), rel=1e-12)
    assert store.models_since(T0) == ["a", "b"]


def test_labelled_gives_the_logits_and_labels_of_the_models_labelled_predictions_oldest_first(store):
    rng = np.random.default_rng(5)
    old = PredictionBatch("old", "m", 1, T0, rng.normal(size=(3, 4)), np.full(3, 0.5))
    late = PredictionBatch("late", "m", 1, T0 + 300, rng.normal(size=(5, 4)), np.full(5, 0.5))
    mid = PredictionBatch("mid", "m", 2, T0 + 120, rng.normal(size=(3, 4)), np.full(3, 0.5))
    foreign = PredictionBatch("foreign", "x", 1, T0 + 200, rng.normal(size=(2, 4)), np.full(2, 0.5))
    store.log_predictions([old, late, mid, foreign])
    labels = {"old.0": 1, "late.4": 3, "late.1": 2, "mid.2": 0, "foreign.0": 1, "unlogged.0": 2}
    store.record_outcomes(
        "m",
        [dataclasses.replace(outcome_of(i), id=key, label=v) for i, (key, v) in enumerate(labels.items())],
    )
    logits, found = store.labelled("m", T0 + 60)
    assert found == [0, 2, 3]  # mid.2, then late.1 and late.4
    np.testing.assert_array_equal(np.stack(logits), np.stack([mid.logits[2], late.logits[1], late.logits[4]]))
    assert store.labelled("m", T0)[1] == [1, 0, 2, 3]
    assert store.labelled("nobody", T0) == ([], [])


# ------------------------------------------------------------------------------------------- retention


def test_prune_drops_by_age_then_the_oldest_beyond_the_row_limit(store):
    rng = np.random.default_rng(3)
    batches = [
        PredictionBatch(f"b{i}", "m", 1, T0 + 60 * i, rng.normal(size=(2, 3)), np.full(2, 0.7))
        for i in range(10)
    ]
    store.log_predictions(batches)
    store.record_outcomes(
        "m", [dataclasses.replace(outcome_of(0), id=f"b{i}.0", at=T0 + 60 * i) for i in range(10)]
    )
    # by age: predictions made before minute 4, and the bins and histograms of those minutes
    assert store.prune(older_than=T0 + 4 * 60, max_rows=1000) == 8
    assert scalar(store, "SELECT COUNT(*) FROM predictions") == 12
    assert store.bin_sums("m", T0, None).total == 6
    assert int(store.confidence_counts("m", T0, None)[0].sum()) == 12
    # outcome ids are kept by the time they were recorded (now): a late repeat still counts once
    assert scalar(store, "SELECT COUNT(*) FROM outcomes") == 10
    assert store.record_outcomes("m", [dataclasses.replace(outcome_of(0), id="b1.0")]) == {"b1.0"}
    # by row count: the oldest predictions go first
    assert store.prune(older_than=T0, max_rows=6) == 6
    left = store.predictions([f"b{i}.{j}" for i in range(10) for j in range(2)])
    assert sorted(left) == [f"b{i}.{j}" for i in (7, 8, 9) for j in (0, 1)]
    assert store.prune(older_than=T0, max_rows=6) == 0
    # everything older than now
    assert store.prune(older_than=time.time() + 120, max_rows=6) == 6
    for table in ("predictions", "outcomes", "bins", "confidence"):
        assert scalar(store, f"SELECT COUNT(*) FROM {table}") == 0, table


# ----------------------------------------------------------------------------------------- concurrency

IDS = 600  # the concurrency tests' id space; each poster takes an overlapping half


def post_outcomes(store: MonitoringStore, seed: int, chunk: int = 30) -> set[str]:
    """Post a random half of the ids, shuffled, ``chunk`` per call; the ids this poster counted."""
    chooser = random.Random(seed)
    numbers = chooser.sample(range(IDS), IDS // 2)
    counted: set[str] = set()
    for start in range(0, len(numbers), chunk):
        part = [outcome_of(number) for number in numbers[start : start + chunk]]
        repeats = store.record_outcomes("m", part)
        counted |= {item.id for item in part} - repeats
    return counted


def check_counted_once(store: MonitoringStore, counted: Sequence[set[str]], seeds: Sequence[int]) -> None:
    posted = {f"o{n}" for seed in seeds for n in random.Random(seed).sample(range(IDS), IDS // 2)}
    assert sum(len(ids) for ids in counted) == len(posted)  # each id counted by exactly one poster
    assert set().union(*counted) == posted
    assert scalar(store, "SELECT COUNT(*) FROM outcomes") == len(posted)
    expected = expected_sums([outcome_of(int(item[1:])) for item in posted])
    for version, sums in expected.items():
        assert_sums_equal(store.bin_sums("m", T0, version), sums)


def test_threads_posting_the_same_ids_at_once_count_each_once(database):
    store = database.open()
    seeds = list(range(8))
    counted: list[set[str]] = [set() for _ in seeds]
    errors: list[BaseException] = []
    start = threading.Barrier(len(seeds))

    def poster(index: int) -> None:
        try:
            start.wait()
            counted[index] = post_outcomes(store, seeds[index])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=poster, args=(i,)) for i in range(len(seeds))]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    elapsed = time.monotonic() - began
    check_counted_once(database.open(), counted, seeds)
    print(f"{database.backend}: 8 threads, {8 * IDS // 2} outcomes in 80 calls: {elapsed:.2f} s")


def test_threads_opening_a_new_sqlite_file_at_once_all_get_it(tmp_path):
    """Eight threads open one new file at once, 100 times over. Switching a new file to WAL takes its
    exclusive lock, and SQLite answers BUSY at once (not after the busy timeout) to all but one of the
    connections asking together; without the retry, about 1 trial in 15 lost a thread to "database is
    locked" here."""
    threads = 8
    for trial in range(100):
        store = SQLiteMonitoringStore(tmp_path / f"{trial}" / "monitoring.sqlite3")
        start = threading.Barrier(threads)

        def first_query(store: MonitoringStore = store, start: threading.Barrier = start) -> BinSums:
            start.wait()
            return store.bin_sums("m", T0, None)

        try:
            with ThreadPoolExecutor(threads) as pool:
                futures = [pool.submit(first_query) for _ in range(threads)]
                answers = [future.result() for future in futures]
        finally:
            store.close()
        assert all(answer.n.sum() == 0 for answer in answers), trial
        with closing(sqlite3.connect(store.path)) as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


POSTER_SCRIPT = """
import json, sys
from tests.test_monitoring_store import open_location, post_outcomes
store = open_location(sys.argv[1])
store.bin_sums("m", 0.0, None)  # connected, schema made
print("ready", flush=True)
sys.stdin.readline()
counted = post_outcomes(store, int(sys.argv[2]))
store.close()
print(json.dumps(sorted(counted)), flush=True)
"""


def python_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_processes_posting_the_same_ids_at_once_count_each_once(database):
    seeds = [101, 102, 103, 104]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", POSTER_SCRIPT, database.location, str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=python_environment(),
        )
        for seed in seeds
    ]
    try:
        for process in processes:
            line = process.stdout.readline()
            assert line.strip() == "ready", (
                line,
                process.stderr.read() if process.poll() is not None else "",
            )
        for process in processes:  # all at once
            process.stdin.write("go\n")
            process.stdin.flush()
        answers = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, err) in zip(processes, answers, strict=True):
        assert process.returncode == 0, err
    counted = [set(json.loads(out.strip().splitlines()[-1])) for out, _ in answers]
    check_counted_once(database.open(), counted, seeds)


# ------------------------------------------------------------------------------------------ durability

WRITER_SCRIPT = """
import sys
from tests.test_monitoring_store import open_location, outcome_of
import dataclasses
store = open_location(sys.argv[1])
round_ = sys.argv[2]
for call in range(100000):
    items = [dataclasses.replace(outcome_of(i), id=f"{round_}.{call}.{i}") for i in range(20)]
    store.record_outcomes("m", items)
    print(f"acked {call}", flush=True)
"""


def test_sqlite_every_acknowledged_outcome_survives_sigkill_of_the_writer(tmp_path):
    path = tmp_path / "monitoring.sqlite3"
    chooser = random.Random(0)
    acked: list[str] = []
    for round_ in range(6):
        wanted = chooser.randint(1, 40)
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(path), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=python_environment(),
        )
        try:
            calls = []
            while len(calls) < wanted:
                line = writer.stdout.readline()
                assert line.startswith("acked "), (
                    line,
                    writer.stderr.read() if writer.poll() is not None else "",
                )
                calls.append(int(line.split()[1]))
            os.kill(writer.pid, signal.SIGKILL)  # mid-write of the next call, most likely
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
        assert writer.returncode == -signal.SIGKILL
        acked += [f"{round_}.{call}.{i}" for call in calls for i in range(20)]
        store = SQLiteMonitoringStore(path)
        try:
            with store._transaction(store._connection(), write=False) as cursor:
                cursor.execute("PRAGMA integrity_check")
                assert cursor.fetchone()[0] == "ok"
                cursor.execute("SELECT id FROM outcomes")
                stored = {row[0] for row in cursor.fetchall()}
            assert set(acked) <= stored
            # outcomes and their bins commit together: nothing half-written
            assert store.bin_sums("m", T0, None).total == len(stored)
            assert len(stored) % 20 == 0
        finally:
            store.close()


@pytest.fixture
def postgres_database(postgres: PostgresServer) -> Iterator[tuple[PostgresServer, str]]:
    """The session's server and a database of its own; the server is running again after the test whatever the
    test did to it."""
    yield postgres, postgres.create_database()
    if not postgres.running:
        postgres.start()


def test_postgres_acknowledged_outcomes_survive_a_crash_and_the_store_carries_on(postgres_database):
    server, dsn = postgres_database
    from service.monitoring_postgres import PostgresMonitoringStore

    store = PostgresMonitoringStore(dsn)
    try:
        items = [outcome_of(i) for i in range(50)]
        assert store.record_outcomes("m", items) == set()
        server.kill()  # SIGKILL to every process of the cluster: recovery replays the WAL
        server.start()
        # the same store: its connection died with the server, and is replaced at the next call
        assert store.record_outcomes("m", [*items[:10], outcome_of(50)]) == {item.id for item in items[:10]}
        expected = expected_sums([*items, outcome_of(50)])
        fresh = PostgresMonitoringStore(dsn)
        try:
            for version, sums in expected.items():
                assert_sums_equal(fresh.bin_sums("m", T0, version), sums)
            assert scalar(fresh, "SELECT COUNT(*) FROM outcomes") == 51
        finally:
            fresh.close()
    finally:
        store.close()


def test_postgres_outage_is_store_unavailable_naming_the_database_without_its_password(postgres_database):
    server, dsn = postgres_database
    from service.monitoring_postgres import PostgresMonitoringStore

    # trust authentication: the password is not checked, but it is in the URL
    with_password = dsn.replace("postgresql://calibserve@", "postgresql://calibserve:s3cret-pw%21@")
    assert with_password != dsn
    store = PostgresMonitoringStore(with_password + "?application_name=probe&password=other-s3cret")
    try:
        assert store.record_outcomes("m", [outcome_of(1)]) == set()
        server.stop()
        for call in (
            lambda: store.record_outcomes("m", [outcome_of(2)]),
            lambda: store.bin_sums("m", T0, None),
            lambda: store.log_predictions([PredictionBatch("p", "m", 1, T0, np.zeros((1, 2)), np.ones(1))]),
        ):
            with pytest.raises(StoreUnavailable) as raised:
                call()
            message = str(raised.value)
            assert f"127.0.0.1:{server.port}/" in message and "calibserve@" in message, message
            for secret in ("s3cret", "s3cret-pw!", "other-s3cret", "s3cret-pw%21"):
                assert secret not in message, message
        server.start()
        # the same store again: a fresh connection, the write that failed was not made
        assert store.record_outcomes("m", [outcome_of(2)]) == set()
        assert store.bin_sums("m", T0, None).total == 2
    finally:
        store.close()
    refused = PostgresMonitoringStore("postgresql://someone:hunter2@127.0.0.1:1/nothing")
    with pytest.raises(StoreUnavailable, match=r"postgresql://someone@127\.0\.0\.1:1/nothing") as raised:
        refused.bin_sums("m", T0, None)
    assert "hunter2" not in str(raised.value)


def test_postgres_outcome_transactions_are_durable_where_synchronous_commit_is_off(postgres_database):
    _, dsn = postgres_database
    from service.monitoring_postgres import PostgresMonitoringStore

    store = PostgresMonitoringStore(dsn + "?options=-c%20synchronous_commit%3Doff")
    try:
        connection = store._connection()
        assert store.relaxed_commit
        for durable, setting in ((False, "off"), (True, "on")):
            with store._transaction(connection, durable=durable) as cursor:
                cursor.execute("SHOW synchronous_commit")
                assert cursor.fetchone()[0] == setting
    finally:
        store.close()
    plain = PostgresMonitoringStore(dsn)
    try:
        plain.bin_sums("m", T0, None)
        assert not plain.relaxed_commit
    finally:
        plain.close()


def test_postgres_replicas_starting_at_once_create_the_schema_once(postgres_database):
    server, dsn = postgres_database
    from service.monitoring_postgres import PostgresMonitoringStore

    stores = [PostgresMonitoringStore(dsn) for _ in range(8)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def replica(store: MonitoringStore, number: int) -> None:
        try:
            start.wait()
            store.record_outcomes("m", [outcome_of(number)])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=replica, args=(store, i)) for i, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not errors, errors
        assert stores[0].bin_sums("m", T0, None).total == 8
    finally:
        for store in stores:
            store.close()
    # close() closes every thread's connection: no session of calibserve's is left on the server
    database = dsn.rsplit("/", 1)[1]
    with server.connect(autocommit=True) as connection:
        deadline = time.monotonic() + 10
        while True:
            sessions = connection.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'calibserve'",
                (database,),
            ).fetchone()[0]
            if sessions == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert sessions == 0


def test_open_store_chooses_the_backend_from_the_settings(tmp_path, postgres_database):
    _, dsn = postgres_database
    from service.monitoring_postgres import PostgresMonitoringStore

    store = open_store(Settings(store_dir=tmp_path, database_url=dsn))
    try:
        assert isinstance(store, PostgresMonitoringStore)
        assert store.record_outcomes("m", [outcome_of(1)]) == set()
    finally:
        store.close()
    local = open_store(Settings(store_dir=tmp_path))
    assert isinstance(local, SQLiteMonitoringStore) and local.path == tmp_path / "monitoring.sqlite3"


def test_a_malformed_postgres_url_is_invalid_input_without_its_password():
    try:
        from service.monitoring_postgres import PostgresMonitoringStore
    except ImportError as error:
        require_or_skip(f"psycopg 3 is not usable ({error}): pip install -e '.[postgres]'")
    with pytest.raises(InvalidInput) as raised:
        PostgresMonitoringStore("postgresql://user:pa55word@host/db?no_such_option=1")
    assert "pa55word" not in str(raised.value) and "postgresql://user@host/db" in str(raised.value)


def test_a_long_window_sums_its_full_hours_and_its_ragged_ends_exactly(store):
    """Rows over 30 hours: a window from any minute reads per-hour sums for its full hours and per-minute sums
    at both ends (window_spans), and adds up to the rows in it, whatever the edges."""
    rng = np.random.default_rng(11)
    n = 1200
    rows = scored(rng, n, 4)
    now = time.time()
    start = now - 30 * 3600
    ats = start + rng.uniform(0, 30 * 3600, n)
    versions = np.ones(n, dtype=int)
    outcomes = outcomes_of(rows, [f"w{i}" for i in range(n)], versions, ats)
    for part in range(0, n, 300):
        store.record_outcomes("a", outcomes[part : part + 300])
    minutes = np.array([minute_of(at) for at in ats])
    for hours_back in (0.5, 1.0, 7.22, 24.0, 29.9):
        since = now - hours_back * 3600
        assert len(window_spans(since, now)) in (1, 3)
        mask = minutes >= minute_of(since)
        assert_sums_equal(store.bin_sums("a", since, 1), BinSums.of_rows(subset(rows, mask)))
        assert_sums_equal(store.all_bin_sums(since)[("a", 1)], BinSums.of_rows(subset(rows, mask)))
