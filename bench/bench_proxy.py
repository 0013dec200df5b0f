"""calibserve as a calibrating proxy in front of Triton, against the same client calling Triton directly.

Starts a real Triton Inference Server (``tests/triton/serve.py`` through ``tests/helpers/triton.py``: PyTriton,
its own ``.venv-triton``) serving ``identity10`` and ``identity1000`` (``x`` FP32 [K] -> ``logits`` = x, up to
64 rows a call), and one ``calibserve serve --upstream <Triton>`` (one uvicorn worker, an empty models
directory, ``CALIBSERVE_LOG_LEVEL=warning``). It fits a temperature for both models through calibserve
(``POST /v1/models/identity{K}/fit`` with 2,000 rows of logits ``3 N(0, 1)`` and labels drawn from
``softmax(logits / 2)``, so T is about 2), so that the proxy really calibrates. Then, with the
``tritonclient.http`` client, as a user would call either server, it measures requests/s, p50 and p99 latency for

- direct: the client calling Triton's ``/v2/models/identity{K}/infer``, asking for ``logits``;
- proxy: the same client calling calibserve's ``/v2/models/identity{K}/infer``, asking for ``probabilities``
  (calibserve forwards the inputs to Triton and answers the calibrated softmax of its logits),

at each concurrency (default 1, 8, 64), for 1 x 10 and 64 x 1000 logits per request, with JSON tensors and
with binary tensor data (``binary_data=True`` for the input and the output). Before a cell is timed, one
answer of each side is checked: Triton's logits equal x, calibserve's probabilities equal softmax(x / T).

Load: one ``tritonclient.http.InferenceServerClient(url, concurrency=C)`` per side and cell (a pool of C
keep-alive connections) shared by C gevent greenlets, each calling the blocking ``client.infer`` in a loop
(closed loop: the next request when the previous answer is parsed). The greenlets are what ``async_infer``
spawns too, but ``async_infer`` sleeps 10 ms after every submission (``gevent.sleep(0.01)`` in tritonclient
2.73), which would cap a closed loop at about 100 requests/s per caller; threads would add the GIL's hand-offs.
The InferInput and InferRequestedOutput objects are built once per cell, so that the client's per-request
work is tritonclient's request body, the HTTP exchange and the answer's parse. The client, calibserve and
Triton (tritonserver, its Python backend stubs and PyTriton's process) share the machine's cores.

Interleaving: every cell runs ``--rounds`` windows per side in the order direct, proxy, proxy, direct, direct,
... (ABBA: a burst of outside load and any drift hit both sides alike), ``--seconds`` per side in all (each
window ``seconds / rounds``, at most ``--max-requests`` requests; a window ends when its last request in flight
is answered). requests/s are medians over the windows, proxy/direct the ratio of those medians; p50/p99 are over
all requests of a cell and side. CPU per request: ``utime + stime`` from ``/proc`` before and after each window,
summed over the cell's windows and divided by the requests answered in them; for calibserve its server
process (and its workers), for Triton every process of serve.py's process group, for the client this process.

Bounded: 2 sizes x 2 encodings x 3 concurrencies x 2 sides x 3 s, plus warm-ups, the starts and the fits:
about 100 s on a 2-core machine (the 64 x 1000 JSON cells at concurrency 64 run past their windows).

Usage: ``.venv/bin/python bench/bench_proxy.py [--seconds 3] [--rounds 4] [--concurrency 1 8 64]
[--sizes 1x10 64x1000] [--encodings JSON binary] [--write] [--readme PATH] [--json PATH]``. ``--write``
replaces the ``bench_proxy`` section of ``bench/README.md`` (or of ``--readme``); ``--json`` writes the
figures.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import httpx
import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402
from bench_server import CLOCK_TICKS, cpu_seconds, free_port, percentile, start, stop, wait_http  # noqa: E402

from tests.helpers.triton import TritonServer, start_triton  # noqa: E402

MODELS = {10: "identity10", 1000: "identity1000"}
SIDES = ("direct", "proxy")
FIT_ROWS = 2000
FIT_TEMPERATURE = 2.0  # the labels' temperature: the fit should find about this
IDLE_SECONDS = 2.0  # how long the servers' CPU use without requests is measured


# ------------------------------------------------------------------------------------------- processes


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of the live processes of process group ``pgid``: serve.py (PyTriton's inference
    callables run in it), tritonserver and the Python backend's stub of each model."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def serve_proxy(port: int, root: Path, upstream: str):
    (root / "models").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "1"]
    command += ["--store-dir", str(root / "store"), "--models-dir", str(root / "models")]
    command += ["--upstream", upstream]
    return start(command, {"CALIBSERVE_LOG_LEVEL": "warning"})


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_temperatures(url: str, classes: list[int]) -> dict[int, float]:
    """A temperature for each identity model, fitted through calibserve on logits (labels drawn at T = 2)."""
    rng = np.random.default_rng(1)
    fitted = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for k in classes:
            logits = (rng.normal(size=(FIT_ROWS, k)) * 3).astype(np.float32)
            p = softmax(logits / FIT_TEMPERATURE)
            labels = (p.cumsum(axis=1) < rng.random((FIT_ROWS, 1))).sum(axis=1).clip(max=k - 1)
            answer = client.post(
                f"/v1/models/{MODELS[k]}/fit", json={"logits": logits.tolist(), "labels": labels.tolist()}
            )
            answer.raise_for_status()
            fitted[k] = float(answer.json()["temperature"])
    return fitted


# --------------------------------------------------------------------------------------------- client


@dataclass
class Side:
    """One side (direct or proxy) of one cell: its windows' figures."""

    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    calibserve_cpu: float = 0.0
    triton_cpu: float = 0.0
    client_cpu: float = 0.0
    upstream_calls: float = 0.0  # calibserve's calls to Triton (its calibserve_upstream_batch_requests count)


@dataclass
class Cell:
    rows: int
    classes: int
    encoding: str  # "JSON" or "binary"
    concurrency: int
    sides: dict[str, Side] = field(default_factory=lambda: {side: Side() for side in SIDES})

    @property
    def size(self) -> str:
        return f"{self.rows} x {self.classes}"


@dataclass
class Target:
    """What one side's client sends: the model, its prepared inputs and requested outputs."""

    client: triton_http.InferenceServerClient
    model: str
    inputs: list
    outputs: list


def window(target: Target, concurrency: int, seconds: float, limit: int) -> tuple[list[float], int, float]:
    """C greenlets calling ``client.infer`` in a loop for ``seconds``: (latencies, errors, elapsed seconds)."""
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    deadline = clock() + seconds

    def caller() -> None:
        nonlocal errors
        while clock() < deadline and len(latencies) < limit:
            began = clock()
            try:
                target.client.infer(target.model, target.inputs, outputs=target.outputs)
            except InferenceServerException:
                errors += 1
            latencies.append(clock() - began)

    began = clock()
    gevent.joinall([gevent.spawn(caller) for _ in range(concurrency)], raise_error=True)
    return latencies, errors, clock() - began


def targets_for(
    cell: Cell, urls: dict[str, str], x: np.ndarray
) -> tuple[dict[str, Target], list[triton_http.InferenceServerClient]]:
    binary = cell.encoding == "binary"
    tensor = triton_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    targets, clients = {}, []
    for side, output in (("direct", "logits"), ("proxy", "probabilities")):
        client = triton_http.InferenceServerClient(
            urls[side].removeprefix("http://"),
            concurrency=cell.concurrency,
            connection_timeout=60.0,
            network_timeout=300.0,
        )
        clients.append(client)
        requested = [triton_http.InferRequestedOutput(output, binary_data=binary)]
        targets[side] = Target(client, MODELS[cell.classes], [tensor], requested)
    return targets, clients


def check_answers(targets: dict[str, Target], x: np.ndarray, temperature: float) -> None:
    """Triton answers x itself; calibserve answers softmax(x / T): the proxy calibrates."""
    direct = targets["direct"]
    logits = direct.client.infer(direct.model, direct.inputs, outputs=direct.outputs).as_numpy("logits")
    np.testing.assert_array_equal(logits, x)
    proxy = targets["proxy"]
    answer = proxy.client.infer(proxy.model, proxy.inputs, outputs=proxy.outputs)
    np.testing.assert_allclose(
        answer.as_numpy("probabilities"), softmax(x / temperature), rtol=1e-5, atol=1e-7
    )
    assert answer.get_response()["parameters"]["calibrator_version"] == 1, answer.get_response()


def upstream_calls(url: str) -> float:
    """How many upstream calls calibserve has made for inference so far (every worker: one here)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    name = "calibserve_upstream_batch_requests_count "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def measure_cell(
    cell: Cell,
    urls: dict[str, str],
    temperature: float,
    pids: dict[str, int],
    args: argparse.Namespace,
) -> None:
    x = (
        np.random.default_rng(cell.rows * 7 + cell.classes).normal(size=(cell.rows, cell.classes)) * 3
    ).astype(np.float32)
    targets, clients = targets_for(cell, urls, x)
    try:
        check_answers(targets, x, temperature)
        for side in SIDES:  # open the C connections of each side and warm both servers: untimed
            window(targets[side], cell.concurrency, min(0.2, args.seconds / args.rounds), args.max_requests)
        seconds = args.seconds / args.rounds
        for index in range(args.rounds):
            order = SIDES if index % 2 == 0 else SIDES[::-1]  # ABBA
            for side in order:
                record = cell.sides[side]
                calibserve_before = cpu_seconds(pids["calibserve"])
                triton_before = group_cpu_seconds(pids["triton"])
                calls_before = upstream_calls(urls["proxy"]) if side == "proxy" else 0.0
                client_before = time.process_time()
                latencies, errors, elapsed = window(
                    targets[side], cell.concurrency, seconds, args.max_requests
                )
                record.client_cpu += time.process_time() - client_before
                if side == "proxy":
                    record.upstream_calls += upstream_calls(urls["proxy"]) - calls_before
                record.calibserve_cpu += cpu_seconds(pids["calibserve"]) - calibserve_before
                record.triton_cpu += group_cpu_seconds(pids["triton"]) - triton_before
                record.rates.append(len(latencies) / elapsed)
                record.latencies += latencies
                record.requests += len(latencies)
                record.errors += errors
    finally:
        for client in clients:
            client.close()


def describe_batching(config: dict) -> str:
    """Triton's batching of the model, from its ``/config``, in words."""
    batcher = config.get("dynamic_batching")
    instances = sum(group.get("count", 1) for group in config.get("instance_group", [])) or 1
    if not batcher:
        return f"no dynamic batcher, {instances} model instance(s)"
    delay = batcher.get("max_queue_delay_microseconds", 0)
    return (
        f"its dynamic batcher on (PyTriton's default: up to {config.get('max_batch_size')} rows, queue delay "
        f"{delay} us, {instances} model instance), so requests that queue while the model runs are served "
        "together"
    )


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second that calibserve and Triton use with no request: part of every window's CPU."""
    calibserve_before, triton_before = cpu_seconds(pids["calibserve"]), group_cpu_seconds(pids["triton"])
    time.sleep(seconds)
    return {
        "calibserve": (cpu_seconds(pids["calibserve"]) - calibserve_before) / seconds,
        "triton": (group_cpu_seconds(pids["triton"]) - triton_before) / seconds,
    }


def run(args: argparse.Namespace) -> tuple[list[Cell], dict]:
    sizes = [tuple(int(part) for part in size.split("x")) for size in args.sizes]
    classes = sorted({k for _, k in sizes})
    unknown = sorted(set(classes) - set(MODELS))
    if unknown:
        raise SystemExit(f"--sizes: class counts {unknown} unknown; Triton serves {sorted(MODELS)}")
    if any(rows > 64 for rows, _ in sizes):
        raise SystemExit("--sizes: at most 64 rows per request (the models' max_batch_size)")
    root = Path(tempfile.mkdtemp(prefix="calibserve-bench-proxy-"))
    triton: TritonServer | None = None
    proxy = None
    try:
        began = time.perf_counter()
        triton = start_triton(models=tuple(MODELS[k] for k in classes))
        triton_start = time.perf_counter() - began
        port = free_port()
        proxy = serve_proxy(port, root, triton.url)
        wait_http(port, "/readyz")
        urls = {"direct": triton.url, "proxy": f"http://127.0.0.1:{port}"}
        temperatures = fit_temperatures(urls["proxy"], classes)
        with httpx.Client(timeout=10) as client:
            triton_version = client.get(triton.url + "/v2").json().get("version", "?")
            config = client.get(f"{triton.url}/v2/models/{MODELS[classes[0]]}/config").json()
        pids = {"calibserve": proxy.pid, "triton": triton.process.pid}
        idle = idle_cpu(pids, IDLE_SECONDS)
        cells = [
            Cell(rows, k, encoding, concurrency)
            for concurrency in args.concurrency
            for rows, k in sizes
            for encoding in args.encodings
        ]
        for number, cell in enumerate(cells, 1):
            measure_cell(cell, urls, temperatures[cell.classes], pids, args)
            print(
                f"[{number}/{len(cells)}] {cell.size} {cell.encoding} c{cell.concurrency} done",
                file=sys.stderr,
            )
        context = {
            "temperatures": temperatures,
            "triton_version": triton_version,
            "triton_batching": describe_batching(config),
            "triton_start_s": triton_start,
            "idle_cpu_per_s": idle,
        }
        return cells, context
    finally:
        if proxy is not None:
            stop(proxy)
        if triton is not None:
            triton.close()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- report


def figures(cell: Cell) -> dict:
    """The cell's reported figures (seconds, requests/s, ratios)."""
    out: dict = {
        "size": cell.size,
        "encoding": cell.encoding,
        "concurrency": cell.concurrency,
    }
    for side, record in cell.sides.items():
        served = max(record.requests, 1)
        out[side] = {
            "rate": statistics.median(record.rates),
            "p50": percentile(record.latencies, 0.5),
            "p99": percentile(record.latencies, 0.99),
            "requests": record.requests,
            "errors": record.errors,
            "calibserve_cpu_per_request": record.calibserve_cpu / served,
            "triton_cpu_per_request": record.triton_cpu / served,
            "client_cpu_per_request": record.client_cpu / served,
            "requests_per_upstream_call": record.requests / record.upstream_calls
            if record.upstream_calls
            else None,
        }
    out["ratio"] = out["proxy"]["rate"] / out["direct"]["rate"]
    out["added_p50"] = out["proxy"]["p50"] - out["direct"]["p50"]
    return out


def _per_call(row: dict) -> str:
    shared = row["proxy"]["requests_per_upstream_call"]
    return "—" if shared is None else f"{shared:.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def tables(rows: list[dict]) -> tuple[str, str]:
    speed = markdown_table(
        [
            "logits",
            "tensors",
            "concurrency",
            "req/s direct",
            "req/s proxy",
            "proxy/direct",
            "p50 ms direct",
            "p50 ms proxy",
            "added p50 ms",
            "p99 ms direct",
            "p99 ms proxy",
            "requests direct / proxy",
            "errors",
        ],
        [
            [
                row["size"],
                row["encoding"],
                row["concurrency"],
                f"{row['direct']['rate']:,.0f}",
                f"{row['proxy']['rate']:,.0f}",
                f"{row['ratio']:.2f}",
                _ms(row["direct"]["p50"]),
                _ms(row["proxy"]["p50"]),
                f"{row['added_p50'] * 1e3:+.2f}",
                _ms(row["direct"]["p99"]),
                _ms(row["proxy"]["p99"]),
                f"{row['direct']['requests']:,} / {row['proxy']['requests']:,}",
                row["direct"]["errors"] + row["proxy"]["errors"],
            ]
            for row in rows
        ],
    )
    cpu = markdown_table(
        [
            "logits",
            "tensors",
            "concurrency",
            "calibserve (proxy)",
            "Triton, direct",
            "Triton, behind the proxy",
            "client, direct",
            "client, proxy",
            "requests per call to Triton (proxy)",
        ],
        [
            [
                row["size"],
                row["encoding"],
                row["concurrency"],
                _ms(row["proxy"]["calibserve_cpu_per_request"]),
                _ms(row["direct"]["triton_cpu_per_request"]),
                _ms(row["proxy"]["triton_cpu_per_request"]),
                _ms(row["direct"]["client_cpu_per_request"]),
                _ms(row["proxy"]["client_cpu_per_request"]),
                _per_call(row),
            ]
            for row in rows
        ],
    )
    return speed, cpu


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    met = [row for row in rows if row["ratio"] >= 0.70]
    missed = [row for row in rows if row["ratio"] < 0.70]
    lowest = min(rows, key=lambda row: row["ratio"])
    text = (
        f"- proxy/direct requests/s >= 0.70: met in {len(met)} of {len(rows)} cells; lowest "
        f"{lowest['ratio']:.2f} ({lowest['size']} {lowest['encoding']}, concurrency {lowest['concurrency']})"
    )
    if missed:
        text += "; missed in " + ", ".join(
            f"{row['size']} {row['encoding']} c{row['concurrency']} ({row['ratio']:.2f})" for row in missed
        )
    lines.append(text)
    for row in rows:
        if row["size"] == "1 x 10" and row["encoding"] == "binary" and row["concurrency"] == 1:
            added = row["added_p50"] * 1e3
            verdict = "met" if added <= 1.0 else "missed"
            lines.append(
                f"- added p50 <= 1 ms for 1 x 10 binary at concurrency 1: {added:+.2f} ms, {verdict}"
            )
    return lines


def cpu_total(row: dict, side: str) -> float:
    """CPU seconds per request of every process involved on one side: client, calibserve (proxy), Triton."""
    figures = row[side]
    total = figures["client_cpu_per_request"] + figures["triton_cpu_per_request"]
    return total + (figures["calibserve_cpu_per_request"] if side == "proxy" else 0.0)


def reading(rows: list[dict], cores: int) -> str:
    """What the numbers say, written from this run's numbers."""
    sentences = []
    lowest = min(rows, key=lambda row: row["ratio"])
    direct, proxy = cpu_total(lowest, "direct"), cpu_total(lowest, "proxy")
    sentences.append(
        "Every proxied request is a second HTTP exchange (client to calibserve, calibserve to Triton) and a "
        "softmax, and on this machine calibserve's CPU comes out of the same cores as the client's and "
        f"Triton's. In the lowest cell ({lowest['size']} {lowest['encoding']}, concurrency "
        f"{lowest['concurrency']}: {lowest['ratio']:.2f}) a proxied request cost {proxy * 1e3:.2f} ms of CPU in "
        f"all (calibserve {lowest['proxy']['calibserve_cpu_per_request'] * 1e3:.2f}, Triton "
        f"{lowest['proxy']['triton_cpu_per_request'] * 1e3:.2f}, client "
        f"{lowest['proxy']['client_cpu_per_request'] * 1e3:.2f}) against {direct * 1e3:.2f} ms direct: once "
        f"the {cores} cores are saturated, requests/s are about cores / CPU per request, which bounds the "
        f"ratio near {direct / proxy:.2f} whatever the latency."
    )
    shared = max(rows, key=lambda row: row["proxy"]["requests_per_upstream_call"] or 0.0)
    sentences.append(
        "Requests that arrive while a call to Triton is in flight share the next call "
        "(`serving/upstream_batching.py`): up to "
        f"{_per_call(shared)} requests per call ({shared['size']} "
        f"{shared['encoding']}, concurrency {shared['concurrency']}), where Triton spent "
        f"{shared['proxy']['triton_cpu_per_request'] * 1e3:.2f} ms of CPU per proxied request against "
        f"{shared['direct']['triton_cpu_per_request'] * 1e3:.2f} ms per direct one."
    )
    faster = [row for row in rows if row["ratio"] > 1.0 and row["encoding"] == "JSON"]
    if faster:
        row = max(faster, key=lambda row: row["ratio"])
        sentences.append(
            f"Where the proxy is faster with JSON tensors ({row['size']}, concurrency {row['concurrency']}: "
            f"{row['ratio']:.2f}x), Triton spent {row['direct']['triton_cpu_per_request'] * 1e3:.1f} ms of CPU "
            "per request parsing and answering JSON directly but "
            f"{row['proxy']['triton_cpu_per_request'] * 1e3:.1f} ms behind the proxy, which sends it binary "
            "tensors and writes the JSON answer itself (calibserve "
            f"{row['proxy']['calibserve_cpu_per_request'] * 1e3:.1f} ms)."
        )
    single = [row for row in rows if row["concurrency"] == min(r["concurrency"] for r in rows)]
    added = [row["added_p50"] * 1e3 for row in single]
    sentences.append(
        f"A lone caller (concurrency {single[0]['concurrency']}) waits {min(added):+.2f} to "
        f"{max(added):+.2f} ms more at p50 through the proxy."
    )
    return " ".join(sentences)


def command_line(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python bench/bench_proxy.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --sizes {' '.join(args.sizes)} "
        f"--encodings {' '.join(args.encodings)} --write"
    )


def report(rows: list[dict], context: dict, args: argparse.Namespace, info: dict, wall_s: float) -> str:
    speed, cpu = tables(rows)
    temperatures = ", ".join(f"{MODELS[k]} T = {t:.3f}" for k, t in sorted(context["temperatures"].items()))
    return "\n".join(
        [
            "## Calibrating proxy in front of Triton (`bench/bench_proxy.py`)",
            "",
            f"Command: `{command_line(args)}` (wall time {wall_s:.0f} s). A real Triton Inference Server "
            f"{context['triton_version']} (PyTriton 0.7.0, `tests/triton/serve.py`, CPU) serving `identity10` "
            f"and `identity1000` (`x` FP32 [K] -> `logits` = x; {context['triton_batching']}), and one `calibserve serve --upstream <Triton>` "
            "(one uvicorn worker, no local models, `CALIBSERVE_LOG_LEVEL=warning`) with a temperature fitted "
            f"through `POST /v1/models/identity{{K}}/fit` on 2,000 rows of logits ({temperatures}). The "
            "`tritonclient.http` client calls Triton directly asking for `logits` (direct), or calibserve asking "
            "for `probabilities`, the calibrated softmax of Triton's logits (proxy); one answer of each was "
            "checked before every cell. Load: one `InferenceServerClient(url, concurrency=C)` per side and cell, "
            "shared by C gevent greenlets each calling the blocking `infer` in a closed loop (not `async_infer`, "
            "which sleeps 10 ms after every submission); inputs and requested outputs built once per cell; "
            "binary means `binary_data=True` for the input and the output. **The load generator, calibserve and "
            f"Triton (tritonserver, its Python stubs, PyTriton's process) all share the same {info['nproc']} "
            "cores**, so absolute rates are lower than from a separate load host, and calibserve's CPU is taken "
            "from the same cores that the client and Triton need. Direct and proxy ran interleaved per cell "
            f"(ABBA, {args.rounds} windows of {args.seconds / args.rounds:g} s per side); req/s are medians "
            "over the windows, p50/p99 over all of a side's requests. Other jobs share the machine (see the "
            "load average below).",
            "",
            speed,
            "",
            "Server and client CPU per request, in ms (`utime + stime` from `/proc` over the cell's windows, "
            "divided by the requests answered; Triton: every process of its process group, i.e. tritonserver, "
            "its Python backend stubs and PyTriton's process, where the model's function runs). Without "
            f"requests, over {IDLE_SECONDS:g} s before the first cell, calibserve used "
            f"{context['idle_cpu_per_s']['calibserve'] * 1e3:.0f} ms and Triton "
            f"{context['idle_cpu_per_s']['triton'] * 1e3:.0f} ms of CPU per second; that share is in the "
            "figures below too.",
            "",
            cpu,
            "",
            "Targets (ratios from this run):",
            "",
            *target_lines(rows),
            "",
            reading(rows, int(info["nproc"])),
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per side and cell, in all")
    parser.add_argument("--rounds", type=int, default=4, help="windows per side and cell (ABBA)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--sizes", nargs="+", default=["1x10", "64x1000"], help="ROWSxCLASSES (10 or 1000)")
    parser.add_argument("--encodings", nargs="+", choices=["JSON", "binary"], default=["JSON", "binary"])
    parser.add_argument("--max-requests", type=int, default=50_000, help="per window")
    parser.add_argument("--write", action="store_true", help="write the section into the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--json", type=Path, help="write the figures (seconds, requests/s) to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info(
        {
            "tritonclient": importlib.metadata.version("tritonclient"),
            "gevent": importlib.metadata.version("gevent"),
        }
    )
    cells, context = run(args)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    rows = [figures(cell) for cell in cells]
    wall_s = time.perf_counter() - started
    text = report(rows, context, args, info, wall_s)
    print(text)
    if args.json is not None:
        document = {
            "cells": rows,
            "temperatures": {MODELS[k]: t for k, t in context["temperatures"].items()},
            "triton_version": context["triton_version"],
            "wall_s": wall_s,
            "machine": info,
        }
        args.json.write_text(json.dumps(document, indent=2))
    if args.write:
        replace_section(args.readme, "bench_proxy", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
