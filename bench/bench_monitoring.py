"""Live calibration monitoring: outcome ingestion, the prediction log's cost, window queries, ``/metrics`` size.

Real ``calibserve serve`` processes (``tests/helpers/servers.py``, 127.0.0.1, logits-only models of 10 classes
with a fitted temperature, ``CALIBSERVE_PREDICTION_LOG=on`` unless said otherwise) and four measurements:

1. Outcome ingestion, one worker: ``POST /v1/models/m/outcomes`` by id (``{"prediction_ids", "labels"}``: the
   ids of rows calibrated beforehand, untimed) and by logits (``{"logits", "labels"}``), next to the stateless
   ``POST /v1/metrics`` (``{"logits", "labels"}``, the figures of the same rows), in calls of 1, 100 and 10,000
   rows (``--batches``). For each size and round the same rows go through the three, one call at a time on
   one keep-alive connection (bodies encoded before the window), in an order that rotates from round to round;
   rows/s are medians over ``--rounds`` rounds. A window is a fixed number of rows, the same for the three,
   sized from an untimed warm-up so that the slowest of them takes about ``--seconds`` (at most
   ``--max-rows``). Every answer is checked after its window (all rows ``counted``, every status 200).
2. The prediction log's cost on the calibrate path: ``POST /v1/models/m/calibrate`` with 1 x 10 JSON logits at
   concurrency ``--concurrency`` (8) on two one-worker servers, log ``on`` and ``off``, in alternating windows
   of ``--seconds`` (ABBA, ``--rounds`` per server; the load generator is ``bench_server.py``'s raw-socket
   asyncio client). req/s are medians over windows; server CPU per request from ``/proc``.
3. A window query at ``--rows`` (10^7) logged rows: a server makes model ``m`` and fits it (version 1); then
   this process fills its ``<store>/monitoring.sqlite3`` directly through
   ``service.monitoring_store.SQLiteMonitoringStore``: ``log_predictions`` of ``PredictionBatch`` answers of
   ``--answer-rows`` rows (random id prefixes, as the service draws them; softmax(z / T) confidences of the
   fitted T), their times in increasing order over the 7 days before the fill (less ``MARGIN_S``, so that every
   row stays in the window while the bench runs), and ``record_outcomes`` of ``--labelled`` of them
   (``Outcome`` rows with the per-row figures of ``service.core.monitoring.row_statistics``), one transaction
   of each per chunk of ``CHUNK_ROWS`` rows. Then a one-worker server on that store answers ``GET
   /v1/models/m/monitoring?window=7d`` ``--queries`` times in a row (one keep-alive connection; the first, on a
   fresh worker, is reported apart); and this process times the two SQL queries behind it
   (``bin_sums``, ``confidence_counts``) in-process. Disk: the database file, its WAL and shared-memory file,
   over the rows logged.
4. ``/metrics`` at ``--models`` (2,000) logits-only models, ``--fitted`` (200) of them fitted: a set-up server
   creates them (``PUT /v1/models/{name}`` with ``{"num_classes": 10}``), fits the 200 (200 rows of logits
   each) and posts 200 outcomes by logits for each fitted model (so that their windows have outcomes), then
   stops. Three servers on that store then run side by side: one worker; ``--workers`` (4) workers
   (``PROMETHEUS_MULTIPROC_DIR``, set by ``calibserve serve``); and one worker with
   ``CALIBSERVE_METRICS_MODEL_LATENCY`` naming every model (a latency histogram per route and model, what every
   scrape carried before per-route histograms). Each is warmed up with one calibrate per model (1 x 10 JSON),
   one ``GET /v1/models/{name}`` per fitted model, and ``/healthz``, ``/readyz``, ``GET /v1/models`` and one
   ``POST /v1/metrics``, each on a fresh connection so that several workers share them. Then ``--scrapes``
   rounds of one ``GET /metrics`` per server (a fresh connection each, the whole answer read), at least
   ``--scrape-gap`` s apart for the same server (default: past the 5 s cache of the monitoring gauges, so every
   scrape reads them from the database, as a Prometheus scraping every 15 s finds them).

Bounded: every loop has a count or a deadline. With the defaults a run took 12 minutes on 2 cores, of which the
fill of 10^7 rows about 4 (its time is reported) and the by-id ingestion calls 3 (each waited 10 s).

Usage: ``.venv/bin/python bench/bench_monitoring.py [--parts ingest overhead query metrics] [--rounds 5]
[--seconds 1] [--batches 1 100 10000] [--rows 10000000] [--models 2000] [--fitted 200] [--workers 4]
[--scrapes 20] [--write] [--readme PATH] [--json PATH]``. ``--write`` replaces the ``bench_monitoring`` section
of ``bench/README.md`` (or of ``--readme``); ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402
from bench_server import RUN, _window, cpu_seconds, http_request, percentile  # noqa: E402

from service.core import monitoring as stats  # noqa: E402
from service.monitoring_store import Outcome, PredictionBatch, SQLiteMonitoringStore  # noqa: E402
from service.serving.monitoring import GAUGES_TTL_S  # noqa: E402
from tests.helpers.servers import Server  # noqa: E402

PARTS = ("ingest", "overhead", "query", "metrics")
CLASSES = 10
TEMPERATURE = 2.0  # the labels are drawn at this temperature: fits find about it
CHUNK_ROWS = 100_000  # rows per transaction of the fill (section 3)
MARGIN_S = 3 * 3600.0  # the fill's newest row is this much younger than 7 days after the oldest
WEEK_S = 7 * 86400.0
MAX_CALIBRATE_ROWS = 10_000  # rows per calibrate call when ids are made for section 1
QUERY_DEADLINE_S = 60.0
INGEST_DEADLINE = 3.0  # no call of an ingestion window starts after this many --seconds
# Targets of the issue, and the /metrics figures before per-route latency histograms (quoted in the issue).
OVERHEAD_TARGET = 0.80
QUERY_TARGET_S = 0.050
SCRAPE_TARGET_BYTES = 1_000_000
SCRAPE_TARGET_S = 0.100
BEFORE_BYTES = 4.68e6
BEFORE_S = 0.577
BEFORE_MODELS = (2000, 200)  # models, fitted
JSON_HEADERS = {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------------------------- data


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def labelled_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits ``3 N(0, 1)`` and labels drawn from ``softmax(logits / 2)``."""
    logits = (rng.normal(size=(n, CLASSES)) * 3).astype(np.float32)
    cumulative = softmax(logits / TEMPERATURE).cumsum(axis=1)
    labels = (cumulative < rng.random((n, 1))).sum(axis=1).clip(max=CLASSES - 1)
    return logits, labels


def dumps(document: dict) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


# --------------------------------------------------------------------------------------------- client


class RawClient:
    """Blocking HTTP/1.1 on one keep-alive socket (``fresh``: a new connection per request): the cheapest
    client, so that the server's time is what a window measures."""

    def __init__(self, port: int, *, fresh: bool = False) -> None:
        self.port = port
        self.fresh = fresh
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=300.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = self._connect()
        sock = self.sock
        try:
            sock.sendall(raw)
            buffer = bytearray()
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed before an answer")
                buffer += chunk
            head = bytes(buffer[:end]).lower()
            match = re.search(rb"\r\ncontent-length: *(\d+)", head)
            if match is None:
                raise ConnectionError(f"no content-length in {head[:200]!r}")
            needed = end + 4 + int(match.group(1))
            while len(buffer) < needed:
                chunk = sock.recv(max(65536, needed - len(buffer)))
                if not chunk:
                    raise ConnectionError("connection closed inside an answer")
                buffer += chunk
            return int(head[9:12]), bytes(buffer[end + 4 : needed])
        finally:
            if self.fresh:
                self.close()

    def call(self, method: str, path: str, document: Any = None) -> Any:
        """A JSON request whose answer must be 2xx: the parsed answer."""
        body = b"" if document is None else dumps(document)
        status, answer = self.request(http_request(method, path, body, JSON_HEADERS if body else None))
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: {status} {answer[:300]!r}")
        return orjson.loads(answer) if answer else None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def make_model(client: RawClient, name: str, rng: np.random.Generator, *, fit_rows: int = 0) -> float | None:
    """PUT a 10-class logits-only model; with ``fit_rows``, fit a temperature on that many rows: its T."""
    client.call("PUT", f"/v1/models/{name}", {"num_classes": CLASSES})
    if not fit_rows:
        return None
    logits, labels = labelled_rows(rng, fit_rows)
    answer = client.call("POST", f"/v1/models/{name}/fit", {"logits": logits, "labels": labels})
    return float(answer["temperature"])


def server(
    store: Path, models: Path, *, log: bool = True, workers: int = 1, env: dict | None = None
) -> Server:
    models.mkdir(parents=True, exist_ok=True)
    environment = {"CALIBSERVE_PREDICTION_LOG": "on" if log else "off", "CALIBSERVE_DEVICE": "cpu"}
    return Server(store, models=models, workers=workers, env={**environment, **(env or {})})


def stop_all(processes: Iterable[Server]) -> None:
    """Stop servers side by side: a server whose prediction log holds rows flushes it as it stops."""
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda process: process.stop(), list(processes)))


# ------------------------------------------------------------------------------------- 1. ingestion

INGEST_CASES = ("by id", "by logits", "/v1/metrics")


@dataclass
class IngestCell:
    batch: int
    calls: dict[str, int] = field(default_factory=dict)  # planned calls per window
    rates: dict[str, list[float]] = field(default_factory=lambda: {case: [] for case in INGEST_CASES})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {case: [] for case in INGEST_CASES})
    call_s: dict[str, list[float]] = field(default_factory=lambda: {case: [] for case in INGEST_CASES})


def calibrated_ids(client: RawClient, logits: np.ndarray) -> list[str]:
    """Calibrate ``logits`` (logged by the server): the prediction ids of their rows."""
    ids: list[str] = []
    for start in range(0, len(logits), MAX_CALIBRATE_ROWS):
        part = logits[start : start + MAX_CALIBRATE_ROWS]
        ids += client.call("POST", "/v1/models/m/calibrate", {"logits": part})["prediction_ids"]
    return ids


def wait_logged(database: Path, prediction_id: str, timeout: float = 60.0) -> None:
    """Wait until the server's background writer has committed ``prediction_id`` (read from the database
    file, opened without creating it, so that no request of the service is involved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=rw", uri=True, timeout=30.0)) as connection:
                query = "SELECT 1 FROM predictions WHERE id = ?"
                if connection.execute(query, (prediction_id,)).fetchone():
                    return
        except sqlite3.OperationalError:  # no file or no table yet
            pass
        time.sleep(0.02)
    raise RuntimeError(f"prediction {prediction_id} not logged after {timeout:g} s")


def ingest_requests(
    case: str, batch: int, calls: int, ids: list[str], logits: np.ndarray, labels: np.ndarray
) -> list[bytes]:
    """The raw requests of one window of ``case``: ``calls`` calls of ``batch`` rows, from the first rows."""
    out = []
    for start in range(0, calls * batch, batch):
        part = slice(start, start + batch)
        if case == "by id":
            body = dumps({"prediction_ids": ids[part], "labels": labels[part]})
        else:
            body = dumps({"logits": logits[part], "labels": labels[part]})
        path = "/v1/metrics" if case == "/v1/metrics" else "/v1/models/m/outcomes"
        out.append(http_request("POST", path, body, JSON_HEADERS))
    return out


def run_calls(
    client: RawClient, requests: list[bytes], pid: int, deadline_s: float
) -> tuple[float, float, list[float], list[tuple[int, bytes]]]:
    """(elapsed seconds, server CPU seconds, seconds per call, answers) of the requests one after another;
    no new call starts after ``deadline_s`` (the first always runs)."""
    cpu_before = cpu_seconds(pid)
    answers, times = [], []
    began = time.perf_counter()
    for raw in requests:
        started = time.perf_counter()
        answers.append(client.request(raw))
        times.append(time.perf_counter() - started)
        if started - began > deadline_s:
            break
    elapsed = time.perf_counter() - began
    return elapsed, cpu_seconds(pid) - cpu_before, times, answers


def check_ingest(case: str, answers: list[tuple[int, bytes]], rows: int) -> None:
    bad = [status for status, _ in answers if status != 200]
    if bad:
        raise RuntimeError(f"{case}: statuses {sorted(set(bad))}: {answers[0][1][:300]!r}")
    if case != "/v1/metrics":
        counted = sum(orjson.loads(body)["counted"] for _, body in answers)
        if counted != rows:
            raise RuntimeError(f"{case}: {counted} of {rows} rows counted")


def window_rows(
    client: RawClient, database: Path, rng: np.random.Generator, calls: dict[str, int], batch: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows for the three cases' windows (as many as the largest needs), the first ones calibrated and logged
    beforehand (their ids, for the by-id window), the writer waited for."""
    logits, labels = labelled_rows(rng, max(calls.values()) * batch)
    ids = calibrated_ids(client, logits[: calls["by id"] * batch])
    wait_logged(database, ids[-1])
    return ids, logits, labels


def measure_ingest(args: argparse.Namespace, root: Path) -> dict:
    rng = np.random.default_rng(10)
    cells = [IngestCell(batch) for batch in args.batches]
    deadline_s = INGEST_DEADLINE * args.seconds
    store = root / "ingest-store"
    with server(store, root / "models") as process:
        client = RawClient(process.port)
        make_model(client, "m", rng, fit_rows=2000)
        pid = process.process.pid
        database = store / "monitoring.sqlite3"
        for cell in cells:
            # warm-up, untimed: at most 50 calls or --seconds per case; each case's window is then sized to
            # take about --seconds (at least one call, at most --max-rows rows)
            warm = {case: max(1, min(50, 20_000 // cell.batch)) for case in INGEST_CASES}
            ids, logits, labels = window_rows(client, database, rng, warm, cell.batch)
            for case in INGEST_CASES:
                requests = ingest_requests(case, cell.batch, warm[case], ids, logits, labels)
                elapsed, _, times, answers = run_calls(client, requests, pid, args.seconds)
                check_ingest(case, answers, len(answers) * cell.batch)
                rate = len(answers) / elapsed  # calls/s
                cell.calls[case] = max(1, min(args.max_rows // cell.batch, round(rate * args.seconds)))
            for index in range(args.rounds):
                ids, logits, labels = window_rows(client, database, rng, cell.calls, cell.batch)
                shift = index % len(INGEST_CASES)
                for case in INGEST_CASES[shift:] + INGEST_CASES[:shift]:
                    requests = ingest_requests(case, cell.batch, cell.calls[case], ids, logits, labels)
                    elapsed, cpu, times, answers = run_calls(client, requests, pid, deadline_s)
                    rows = len(answers) * cell.batch
                    check_ingest(case, answers, rows)
                    cell.rates[case].append(rows / elapsed)
                    cell.cpu[case].append(cpu / rows)
                    cell.call_s[case] += times
            print(f"ingest: calls of {cell.batch} rows done", file=sys.stderr)
        client.close()
    return {
        "cells": [
            {
                "batch": cell.batch,
                **{
                    case: {
                        "rows_per_s": statistics.median(cell.rates[case]),
                        "rates": cell.rates[case],
                        "server_cpu_per_row_s": statistics.median(cell.cpu[case]),
                        "call_s_median": statistics.median(cell.call_s[case]),
                        "calls": len(cell.call_s[case]),
                        "planned_calls_per_window": cell.calls[case],
                    }
                    for case in INGEST_CASES
                },
            }
            for cell in cells
        ]
    }


# --------------------------------------------------------------------------------------- 2. overhead


def measure_overhead(args: argparse.Namespace, root: Path) -> dict:
    rng = np.random.default_rng(20)
    logits = (rng.normal(size=(1, CLASSES)) * 3).astype(np.float32)
    raw = http_request("POST", "/v1/models/m/calibrate", dumps({"logits": logits}), JSON_HEADERS)
    sides = ("off", "on")
    figures = {side: {"rates": [], "latencies": [], "cpu": 0.0, "requests": 0, "errors": 0} for side in sides}
    processes: dict[str, Server] = {}
    try:
        for side in sides:
            processes[side] = server(root / f"overhead-{side}", root / "models", log=side == "on")
            client = RawClient(processes[side].port)
            make_model(client, "m", rng, fit_rows=2000)
            answer = client.call("POST", "/v1/models/m/calibrate", {"logits": logits})
            if ("prediction_ids" in answer) != (side == "on"):
                raise RuntimeError(f"log {side}: prediction_ids {'missing' if side == 'on' else 'present'}")
            client.close()
        for side in sides:  # warm both: untimed
            RUN(
                _window(
                    processes[side].port, raw, args.concurrency, min(0.3, args.seconds), args.max_requests
                )
            )
        for index in range(args.rounds):
            for side in sides if index % 2 == 0 else sides[::-1]:  # ABBA
                record = figures[side]
                pid = processes[side].process.pid
                before = cpu_seconds(pid)
                began = time.perf_counter()
                latencies, errors = RUN(
                    _window(processes[side].port, raw, args.concurrency, args.seconds, args.max_requests)
                )
                elapsed = time.perf_counter() - began
                record["cpu"] += cpu_seconds(pid) - before
                # the window: from its start to its last answer (the connections' set-up excluded)
                record["rates"].append(len(latencies) / max(args.seconds, sum(latencies) / args.concurrency))
                record["latencies"] += latencies
                record["requests"] += len(latencies)
                record["errors"] += errors
                record.setdefault("elapsed", []).append(elapsed)
        print("overhead: done", file=sys.stderr)
    finally:
        stop_all(processes.values())
    out = {}
    for side, record in figures.items():
        out[side] = {
            "rate": statistics.median(record["rates"]),
            "rates": record["rates"],
            "p50": percentile(record["latencies"], 0.5),
            "p99": percentile(record["latencies"], 0.99),
            "cpu_per_request": record["cpu"] / max(record["requests"], 1),
            "requests": record["requests"],
            "errors": record["errors"],
        }
    out["ratio"] = out["on"]["rate"] / out["off"]["rate"]
    return out


# ------------------------------------------------------------------------------------------ 3. query


def fill(
    store: SQLiteMonitoringStore, args: argparse.Namespace, temperature: float, progress: Callable
) -> dict:
    """Log ``args.rows`` rows of model m (version 1) over the last 7 days, oldest first, and record outcomes for
    ``args.labelled`` of them; the times spent."""
    rng = np.random.default_rng(30)
    now = time.time()
    first, last = now - WEEK_S + MARGIN_S, now
    answer_rows = args.answer_rows
    spent = {"prepare_s": 0.0, "log_predictions_s": 0.0, "record_outcomes_s": 0.0}
    logged = labelled = 0
    chunks = math.ceil(args.rows / CHUNK_ROWS)
    report_every = max(1, chunks // 10)
    for chunk in range(chunks):
        began = time.perf_counter()
        n = min(CHUNK_ROWS, args.rows - logged)
        answers = math.ceil(n / answer_rows)
        logits = rng.normal(size=(n, CLASSES)) * 3
        probabilities = softmax(logits / temperature)
        labels = (probabilities.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=CLASSES - 1)
        scored = stats.row_statistics(probabilities, labels)
        span = (last - first) / chunks
        times = np.sort(first + span * (chunk + rng.random(answers)))
        batches = []
        row_ids: list[str] = []
        row_times: list[float] = []
        for index in range(answers):
            part = slice(index * answer_rows, min(n, (index + 1) * answer_rows))
            batch = PredictionBatch(
                secrets.token_hex(8), "m", 1, float(times[index]), logits[part], scored.confidence[part]
            )
            batches.append(batch)
            row_ids += batch.ids()
            row_times += [batch.at] * len(batch.logits)
        columns = [
            scored.bins.tolist(),
            scored.confidence.tolist(),
            scored.correct.tolist(),
            scored.brier.tolist(),
            scored.nll.tolist(),
        ]
        label_list = labels.tolist()
        outcomes = [
            Outcome(row_ids[i], 1, row_times[i], label_list[i], *(column[i] for column in columns))
            for i in np.flatnonzero(rng.random(n) < args.labelled).tolist()
        ]
        middle = time.perf_counter()
        store.log_predictions(batches)
        logged_at = time.perf_counter()
        store.record_outcomes("m", outcomes)
        done = time.perf_counter()
        spent["prepare_s"] += middle - began
        spent["log_predictions_s"] += logged_at - middle
        spent["record_outcomes_s"] += done - logged_at
        logged += n
        labelled += len(outcomes)
        if (chunk + 1) % report_every == 0 or chunk + 1 == chunks:
            progress(f"query: {logged:,} rows logged, {labelled:,} outcomes")
    return {**spent, "rows": logged, "outcomes": labelled, "first": first, "last": last}


def table_rows(path: Path, table: str) -> int:
    with closing(sqlite3.connect(path)) as connection:
        return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def measure_query(args: argparse.Namespace, root: Path) -> dict:
    rng = np.random.default_rng(31)
    store_dir = root / "query-store"
    with server(store_dir, root / "models") as process:
        client = RawClient(process.port)
        temperature = make_model(client, "m", rng, fit_rows=2000)
        client.close()
    assert temperature is not None
    path = store_dir / "monitoring.sqlite3"
    store = SQLiteMonitoringStore(path)
    began = time.perf_counter()
    filled = fill(store, args, temperature, lambda line: print(line, file=sys.stderr))
    filled["wall_s"] = time.perf_counter() - began
    store.close()
    files = {
        name: (store_dir / name).stat().st_size
        for name in os.listdir(store_dir)
        if name.startswith("monitoring")
    }
    counts = {table: table_rows(path, table) for table in ("predictions", "outcomes", "bins", "confidence")}
    latencies: list[float] = []
    with server(store_dir, root / "models") as process:
        client = RawClient(process.port)
        request = http_request("GET", "/v1/models/m/monitoring?window=7d")
        deadline = time.perf_counter() + QUERY_DEADLINE_S
        answer: dict = {}
        for index in range(args.queries + 1):
            started = time.perf_counter()
            status, body = client.request(request)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"monitoring query: {status} {body[:300]!r}")
            if index == 0:
                answer = orjson.loads(body)
            if time.perf_counter() > deadline:
                break
        client.close()
    # the two SQL queries behind the answer, in this process (the server stopped): medians of 5
    store = SQLiteMonitoringStore(path)
    since = time.time() - WEEK_S
    sql = {}
    for name, query in (
        ("bin_sums", lambda: store.bin_sums("m", since, 1)),
        ("confidence_counts", lambda: store.confidence_counts("m", since, 1)),
    ):
        query()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            query()
            times.append(time.perf_counter() - started)
        sql[name] = statistics.median(times)
    store.close()
    print("query: done", file=sys.stderr)
    rest = latencies[1:] or latencies
    return {
        "fill": filled,
        "answer_rows": args.answer_rows,
        "labelled_fraction": args.labelled,
        "temperature": temperature,
        "files": files,
        "bytes_per_row": sum(files.values()) / max(filled["rows"], 1),
        "table_rows": counts,
        "first_query_s": latencies[0],
        "queries": len(rest),
        "p50": percentile(rest, 0.5),
        "p99": percentile(rest, 0.99),
        "max": max(rest),
        "sql_s": sql,
        "window_outcomes": answer.get("figures", {}).get("n"),
        "window_predictions": answer.get("label_free", {}).get("predictions"),
        "drift_state": answer.get("drift", {}).get("state"),
    }


# ---------------------------------------------------------------------------------------- 4. /metrics


def family_of(line: str) -> str:
    """The metric family of one exposition line (``_bucket``, ``_total``, ... folded into their family)."""
    name = line.split("{", 1)[0].split(" ", 1)[0]
    return re.sub(r"_(bucket|count|sum|created|total)$", "", name)


def exposition_parts(text: str) -> dict[str, Any]:
    """Bytes and samples of a scrape by group: monitoring gauges (and how many of their models had no
    outcomes), request counters, latency histograms, the rest."""
    groups = {
        "monitoring gauges": lambda family: (
            family.startswith("calibserve_monitoring_") and family != "calibserve_monitoring_outcomes"
        ),
        "request counters": lambda family: family == "calibserve_requests",
        "latency histograms": lambda family: family.endswith("request_duration_seconds"),
    }
    out: dict[str, Any] = {name: {"bytes": 0, "samples": 0} for name in (*groups, "other")}
    out["created_samples"] = sum(
        1 for line in text.splitlines() if not line.startswith("#") and "_created" in line.split("{", 1)[0]
    )
    models_with_outcomes: set[str] = set()
    gauge_models: set[str] = set()
    for line in text.splitlines():
        size = len(line) + 1
        family = family_of(line.removeprefix("# HELP ").removeprefix("# TYPE ")) if line else ""
        group = next((name for name, test in groups.items() if test(family)), "other")
        out[group]["bytes"] += size
        if not line.startswith("#"):
            out[group]["samples"] += 1
            if group == "monitoring gauges":
                model = re.search(r'model="([^"]*)"', line)
                if model:
                    gauge_models.add(model.group(1))
                    if (
                        line.startswith("calibserve_monitoring_window_outcomes{")
                        and float(line.rsplit(" ", 1)[1]) > 0
                    ):
                        models_with_outcomes.add(model.group(1))
    out["gauge_models"] = len(gauge_models)
    out["gauge_models_with_outcomes"] = len(models_with_outcomes)
    return out


def set_up_models(root: Path, args: argparse.Namespace) -> list[str]:
    """The models of section 4 in a store of their own (made by a server that then stops)."""
    rng = np.random.default_rng(40)
    names = [f"model-{index:04d}" for index in range(args.models)]
    with server(root / "metrics-store", root / "models") as process:
        client = RawClient(process.port)
        for index, name in enumerate(names):
            make_model(client, name, rng, fit_rows=200 if index < args.fitted else 0)
        for name in names[: args.fitted]:
            logits, labels = labelled_rows(rng, 200)
            client.call("POST", f"/v1/models/{name}/outcomes", {"logits": logits, "labels": labels})
        client.close()
    return names


def warm_up(port: int, names: list[str], fitted: int) -> None:
    """One calibrate per model, a model GET per fitted model, a few global routes: fresh connections, so that
    the requests spread over the workers as a load balancer's would."""
    client = RawClient(port, fresh=True)
    row = np.ones((1, CLASSES), np.float32)
    for name in names:
        client.call("POST", f"/v1/models/{name}/calibrate", {"logits": row})
    for name in names[:fitted]:
        client.call("GET", f"/v1/models/{name}")
    for path in ("/healthz", "/readyz", "/v1/models"):
        client.call("GET", path)
    logits, labels = labelled_rows(np.random.default_rng(41), 100)
    client.call("POST", "/v1/metrics", {"logits": logits, "labels": labels})


def measure_metrics(args: argparse.Namespace, root: Path) -> dict:
    names = set_up_models(root, args)
    configurations = {
        "1 worker": {"workers": 1, "env": {}},
        f"{args.workers} workers": {"workers": args.workers, "env": {}},
        "1 worker, per-model latency for every model": {
            "workers": 1,
            "env": {"CALIBSERVE_METRICS_MODEL_LATENCY": ",".join(names)},
        },
    }
    processes: dict[str, Server] = {}
    results: dict[str, dict] = {}
    try:
        for label, configuration in configurations.items():
            processes[label] = server(
                root / "metrics-store",
                root / "models",
                workers=configuration["workers"],
                env=configuration["env"],
            )
            warm_up(processes[label].port, names, args.fitted)
            results[label] = {"workers": configuration["workers"], "seconds": [], "bytes": [], "parts": None}
            print(f"metrics: {label} warmed up", file=sys.stderr)
        request = http_request("GET", "/metrics")
        last: dict[str, float] = {}
        for _ in range(args.scrapes):
            for label, process in processes.items():
                wait = args.scrape_gap - (time.monotonic() - last.get(label, -math.inf))
                if wait > 0:
                    time.sleep(wait)
                client = RawClient(process.port, fresh=True)
                last[label] = time.monotonic()
                started = time.perf_counter()
                status, body = client.request(request)
                elapsed = time.perf_counter() - started
                if status != 200:
                    raise RuntimeError(f"/metrics of {label}: {status}")
                results[label]["seconds"].append(elapsed)
                results[label]["bytes"].append(len(body))
                results[label]["parts"] = exposition_parts(body.decode())
        print("metrics: done", file=sys.stderr)
    finally:
        stop_all(processes.values())
    for record in results.values():
        record["p50"] = statistics.median(record["seconds"])
        record["max"] = max(record["seconds"])
        record["median_bytes"] = statistics.median(record["bytes"])
    return {"models": len(names), "fitted": args.fitted, "configurations": results}


# --------------------------------------------------------------------------------------------- report


def mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def ingest_section(figures: dict, args: argparse.Namespace) -> list[str]:
    rows = []
    for cell in figures["cells"]:
        metrics = cell["/v1/metrics"]["rows_per_s"]
        rows.append(
            [
                f"{cell['batch']:,}",
                f"{cell['by id']['rows_per_s']:,.1f}",
                f"{cell['by logits']['rows_per_s']:,.0f}",
                f"{metrics:,.0f}",
                f"{cell['by id']['rows_per_s'] / metrics:.2g}",
                f"{cell['by logits']['rows_per_s'] / metrics:.2f}",
                " / ".join(f"{cell[case]['call_s_median'] * 1e3:,.1f}" for case in INGEST_CASES),
                " / ".join(f"{cell[case]['server_cpu_per_row_s'] * 1e6:,.1f}" for case in INGEST_CASES),
                " / ".join(f"{cell[case]['calls']:,}" for case in INGEST_CASES),
            ]
        )
    table = markdown_table(
        [
            "rows a call",
            "outcomes by id, rows/s",
            "outcomes by logits, rows/s",
            "POST /v1/metrics, rows/s",
            "by id / metrics",
            "by logits / metrics",
            "ms a call, median (id / logits / metrics)",
            "server CPU us/row (id / logits / metrics)",
            "calls timed (id / logits / metrics)",
        ],
        rows,
    )
    lines = [
        "### 1. Outcome ingestion (one worker)",
        "",
        "Model `m` (10 classes, a fitted temperature), prediction log on. By id: the ids of rows calibrated "
        "(and logged: the bench waited until the database held them) before the window; by logits: the same "
        "rows' logits and labels, scored with the active calibrator and logged with their outcome; `POST "
        "/v1/metrics`: the same rows' figures, nothing stored. One call at a time on one keep-alive connection, "
        f"bodies encoded beforehand; each case's window was sized from an untimed warm-up to take about "
        f"{args.seconds:g} s (at least one call, at most {args.max_rows:,} rows; no call starts after "
        f"{INGEST_DEADLINE * args.seconds:g} s). rows/s are medians over {args.rounds} rounds, the three "
        "interleaved (the order rotates each round); every answer was 200 and every outcome `counted`. An "
        "outcome call commits durably (`synchronous=FULL`, one fsync per call) before it answers.",
        "",
        table,
    ]
    return lines


def overhead_section(figures: dict, args: argparse.Namespace) -> list[str]:
    rows = [
        [
            f"`CALIBSERVE_PREDICTION_LOG={side}`",
            f"{figures[side]['rate']:,.0f}",
            ms(figures[side]["p50"]),
            ms(figures[side]["p99"]),
            f"{figures[side]['cpu_per_request'] * 1e6:,.0f}",
            f"{figures[side]['requests']:,}",
            figures[side]["errors"],
        ]
        for side in ("off", "on")
    ]
    table = markdown_table(
        ["server", "req/s (median)", "p50 ms", "p99 ms", "server CPU us/req", "requests", "non-200"], rows
    )
    ratio = figures["ratio"]
    line = (
        f"Target: on / off >= {OVERHEAD_TARGET:.0%}: {ratio:.1%}, {verdict(ratio >= OVERHEAD_TARGET)}"
        + ("" if ratio >= OVERHEAD_TARGET else f" (short by {OVERHEAD_TARGET - ratio:.1%} points)")
        + f"; per-window ratios of the rounds: {', '.join(f'{on / off:.2f}' for on, off in zip(figures['on']['rates'], figures['off']['rates'], strict=True))}."
    )
    return [
        "### 2. Prediction log on the calibrate path",
        "",
        f"`POST /v1/models/m/calibrate`, 1 x 10 JSON logits, concurrency {args.concurrency} (`bench_server.py`'s "
        "raw-socket asyncio client, keep-alive), two one-worker servers, log off and on, in alternating windows "
        f"of {args.seconds:g} s (ABBA, {args.rounds} per server). With the log on every answer carries its "
        "`prediction_ids`, and the rows are written by the server's background thread in group commits.",
        "",
        table,
        "",
        line,
    ]


def query_section(figures: dict, args: argparse.Namespace) -> list[str]:
    filled = figures["fill"]
    files = figures["files"]
    total = sum(files.values())
    table = markdown_table(
        ["figure", "value"],
        [
            ["logged rows (model `m`, version 1, 10 classes)", f"{filled['rows']:,}"],
            ["outcomes recorded", f"{filled['outcomes']:,} ({figures['labelled_fraction']:.0%})"],
            [
                "fill: wall time (prepare / log_predictions / record_outcomes)",
                f"{filled['wall_s']:.0f} s ({filled['prepare_s']:.0f} / {filled['log_predictions_s']:.0f} / "
                f"{filled['record_outcomes_s']:.0f} s), {filled['rows'] / filled['wall_s']:,.0f} logged rows/s",
            ],
            [
                "disk: database + WAL + shm",
                " + ".join(mb(files.get(f"monitoring.sqlite3{suffix}", 0)) for suffix in ("", "-wal", "-shm"))
                + f" = {mb(total)}",
            ],
            ["disk bytes per logged row", f"{figures['bytes_per_row']:,.0f}"],
            [
                "rows in bins / confidence (all minutes)",
                f"{figures['table_rows']['bins']:,} / {figures['table_rows']['confidence']:,}",
            ],
            [
                "window 7d: outcomes / predictions in the answer",
                f"{figures['window_outcomes']:,} / {figures['window_predictions']:,}",
            ],
            ["first query on a fresh server, ms", ms(figures["first_query_s"])],
            [
                f"query p50 / p99 / max, ms ({figures['queries']} queries)",
                f"{ms(figures['p50'])} / {ms(figures['p99'])} / {ms(figures['max'])}",
            ],
            [
                "of which SQL in-process: bin_sums / confidence_counts, ms",
                f"{ms(figures['sql_s']['bin_sums'])} / {ms(figures['sql_s']['confidence_counts'])}",
            ],
        ],
    )
    p99 = figures["p99"]
    line = f"Target: query < {QUERY_TARGET_S * 1e3:.0f} ms: p50 {ms(figures['p50'])} ms, p99 {ms(p99)} ms, "
    if p99 < QUERY_TARGET_S:
        line += "met"
    else:
        line += f"missed (p99 {p99 / QUERY_TARGET_S:.1f}x the target)"
    sql_total = sum(figures["sql_s"].values())
    line += (
        f". In-process, the two SQL queries behind an answer took {ms(sql_total)} ms together (against the "
        f"server's p50 of {ms(figures['p50'])} ms): a 7-day window sums the per-hour rows of its full hours "
        f"and the per-minute rows of its two ends, of `bins` (up to {stats.N_BINS} a row time) and of "
        f"`confidence` (up to {stats.CONFIDENCE_BINS}), however many rows were logged."
    )
    return [
        f"### 3. Window query at {filled['rows']:,} logged rows",
        "",
        "The database was filled directly through `SQLiteMonitoringStore` (`log_predictions` of answers of "
        f"{figures['answer_rows']} rows with random id prefixes, their times increasing over the 7 days before "
        f"the fill less {MARGIN_S / 3600:.0f} h, and `record_outcomes` of a random {figures['labelled_fraction']:.0%} "
        f"of them, one transaction of each per {CHUNK_ROWS:,} rows, as one process). Then a one-worker server on "
        f"that store answered `GET /v1/models/m/monitoring?window=7d` {figures['queries'] + 1} times in a row on "
        "one keep-alive connection; p50/p99 exclude the first (a fresh worker's first query). The SQL times are "
        "this process's own `bin_sums` and `confidence_counts` calls on the same file (medians of 5).",
        "",
        table,
        "",
        line,
    ]


def metrics_section(figures: dict, args: argparse.Namespace) -> list[str]:
    rows = []
    created = sum(record["parts"].get("created_samples", 0) for record in figures["configurations"].values())
    for label, record in figures["configurations"].items():
        parts = record["parts"]
        rows.append(
            [
                label,
                mb(record["median_bytes"]),
                ms(record["p50"]),
                ms(record["max"]),
                *(
                    f"{mb(parts[group]['bytes'])} ({parts[group]['samples']:,})"
                    for group in ("monitoring gauges", "request counters", "latency histograms", "other")
                ),
            ]
        )
    table = markdown_table(
        [
            "server",
            "bytes a scrape",
            "ms p50",
            "ms max",
            "monitoring gauges (samples)",
            "request counters (samples)",
            "latency histograms (samples)",
            "other (samples)",
        ],
        rows,
    )
    lines = []
    comparable = (figures["models"], figures["fitted"]) == BEFORE_MODELS
    for label, record in figures["configurations"].items():
        if "per-model latency" in label:
            continue
        size, seconds = record["median_bytes"], record["p50"]
        text = (
            f"- {label}: {mb(size)}, {verdict(size < SCRAPE_TARGET_BYTES)} (< 1 MB"
            + ("" if size < SCRAPE_TARGET_BYTES else f"; {size / SCRAPE_TARGET_BYTES:.2f}x")
            + f"); {ms(seconds)} ms p50, {verdict(seconds < SCRAPE_TARGET_S)} (< {SCRAPE_TARGET_S * 1e3:.0f} ms"
            + ("" if seconds < SCRAPE_TARGET_S else f"; {seconds / SCRAPE_TARGET_S:.2f}x")
            + ")"
        )
        if comparable:
            text += (
                f"; before: {mb(BEFORE_BYTES)} and {BEFORE_S * 1e3:.0f} ms, now {BEFORE_BYTES / size:.1f}x "
                f"smaller and {BEFORE_S / seconds:.1f}x faster"
            )
        lines.append(text)
    first = next(iter(figures["configurations"].values()))["parts"]
    gauges = first["monitoring gauges"]
    dominant = max(
        ("monitoring gauges", "request counters", "latency histograms", "other"),
        key=lambda g: first[g]["bytes"],
    )
    total = sum(
        first[g]["bytes"] for g in ("monitoring gauges", "request counters", "latency histograms", "other")
    )
    reading = (
        f"In the one-worker scrape the largest part is the {dominant} ({first[dominant]['bytes'] / total:.0%} of "
        f"the bytes). The monitoring gauges cover {first['gauge_models']:,} models, {first['gauge_models_with_outcomes']:,} "
        f"of them with outcomes in a window: the others are there because their calibrate was logged "
        f"(`window_predictions`, `expected_accuracy`, `too_few_outcomes`, `drift` for each window), "
        f"{gauges['samples']:,} gauge samples in all."
    )
    return [
        f"### 4. `/metrics` at {figures['models']:,} models ({figures['fitted']:,} fitted)",
        "",
        f"{figures['models']:,} logits-only models (10 classes), {figures['fitted']:,} with a fitted temperature and "
        "200 outcomes (by logits) in the exported windows (`CALIBSERVE_MONITORING_WINDOWS` default `1h,24h`), "
        "prediction log on. Each server was warmed up with one calibrate per model, one `GET /v1/models/{name}` "
        "per fitted model and `/healthz`, `/readyz`, `GET /v1/models`, `POST /v1/metrics` (fresh connections, "
        f"spread over the workers). {args.scrapes} scrapes per server, interleaved, each on a fresh connection "
        f"and at least {args.scrape_gap:g} s after the same server's previous one (the monitoring gauges are "
        f"cached {GAUGES_TTL_S:g} s per worker: every scrape read them from the database). The last server names "
        "every model in `CALIBSERVE_METRICS_MODEL_LATENCY`, i.e. a latency histogram per route and model as "
        "every scrape had before. Bytes by group are from the last scrape, `# HELP`/`# TYPE` lines included; "
        f"`_created` samples in the last scrape of each server: {created} (calibserve turns them off: they would double every counter).",
        "",
        table,
        "",
        f"Targets (< 1 MB and < 100 ms per scrape; before: {mb(BEFORE_BYTES)} and {BEFORE_S * 1e3:.0f} ms per "
        f"scrape at {BEFORE_MODELS[0]:,} models, {BEFORE_MODELS[1]:,} fitted, with a latency histogram per "
        "route and model, quoted in the issue):",
        "",
        *lines,
        "",
        reading,
    ]


def command_line(args: argparse.Namespace) -> str:
    parts = [".venv/bin/python bench/bench_monitoring.py"]
    if list(args.parts) != list(PARTS):
        parts.append("--parts " + " ".join(args.parts))
    parts.append(
        f"--rounds {args.rounds} --seconds {args.seconds:g} --batches {' '.join(map(str, args.batches))}"
    )
    parts.append(f"--rows {args.rows} --models {args.models} --fitted {args.fitted} --workers {args.workers}")
    parts.append(f"--scrapes {args.scrapes} --write")
    return " ".join(parts)


def report(results: dict, args: argparse.Namespace, info: dict, wall_s: float) -> str:
    lines = [
        "## Live monitoring (`bench/bench_monitoring.py`)",
        "",
        f"Command: `{command_line(args)}` (wall time {wall_s:.0f} s). Real `calibserve serve` processes on "
        "127.0.0.1 (`tests/helpers/servers.py`), SQLite monitoring database in the store directory, logits-only "
        "models of 10 classes; float32 logits `3 N(0, 1)`, labels drawn from `softmax(logits / 2)`. The clients "
        f"share the {info['nproc']} cores with the servers, and other jobs share the machine (load average "
        "below): compare the ratios of one run.",
    ]
    sections = {
        "ingest": ingest_section,
        "overhead": overhead_section,
        "query": query_section,
        "metrics": metrics_section,
    }
    for part in PARTS:
        if part in results:
            lines += ["", *sections[part](results[part], args)]
    lines += ["", "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=5, help="rounds of sections 1 and 2")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="about this long per window (sections 1, 2)"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 100, 10_000], help="rows per outcome call"
    )
    parser.add_argument("--max-rows", type=int, default=100_000, help="most rows per ingestion window")
    parser.add_argument("--concurrency", type=int, default=8, help="section 2")
    parser.add_argument("--max-requests", type=int, default=50_000, help="per window of section 2")
    parser.add_argument("--rows", type=int, default=10_000_000, help="logged rows of section 3")
    parser.add_argument("--labelled", type=float, default=0.8, help="fraction of them with an outcome")
    parser.add_argument("--answer-rows", type=int, default=10, help="rows per logged answer (section 3)")
    parser.add_argument("--queries", type=int, default=200, help="monitoring queries (section 3)")
    parser.add_argument("--models", type=int, default=2000, help="section 4")
    parser.add_argument("--fitted", type=int, help="fitted models of section 4 (default: a tenth)")
    parser.add_argument("--workers", type=int, default=4, help="the multi-worker server of section 4")
    parser.add_argument("--scrapes", type=int, default=20, help="per server (section 4)")
    parser.add_argument(
        "--scrape-gap", type=float, default=GAUGES_TTL_S + 0.2, help="seconds between scrapes of one server"
    )
    parser.add_argument("--write", action="store_true", help="write the section into the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.fitted is None:
        args.fitted = max(1, args.models // 10)
    args.fitted = min(args.fitted, args.models)
    started = time.perf_counter()
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="calibserve-bench-monitoring-"))
    results: dict[str, dict] = {}
    measures = {
        "ingest": measure_ingest,
        "overhead": measure_overhead,
        "query": measure_query,
        "metrics": measure_metrics,
    }
    try:
        for part in PARTS:
            if part in args.parts:
                results[part] = measures[part](args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    wall_s = time.perf_counter() - started
    if args.json is not None:  # first: the figures survive a failure to render them
        args.json.write_text(json.dumps({**results, "wall_s": wall_s, "machine": info}, indent=2))
    text = report(results, args, info, wall_s)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_monitoring", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
