"""Dynamic batching of ``/predict`` under HTTP load: the same server with batching off and on.

Starts two ``python -m service serve`` processes (one uvicorn worker each, 127.0.0.1, ``CALIBSERVE_DEVICE
=cpu``) on the shipped TorchScript model ``digits-mlp`` (64 float inputs -> 10 logits): A with dynamic
batching off (``CALIBSERVE_BATCH_MAX_SIZE=0``), B with it on (``CALIBSERVE_BATCH_MAX_SIZE=64``,
``CALIBSERVE_BATCH_MAX_DELAY_MS=2``). Then, in one run, it measures requests/s, p50 and p99 latency and
the server's CPU time per request for ``POST /v1/models/digits-mlp/predict`` with a 1-row body (the first
row of ``models/digits-mlp/test.npz``) as JSON and as ``.npy``, at concurrency 1, 8 and 64, and for B the
mean number of requests each forward pass served.

The load generator, the server start/stop and the CPU accounting are ``bench/bench_server.py``'s (asyncio
client on raw keep-alive sockets, one connection per unit of concurrency, ``utime + stime`` from
``/proc``); the table and README helpers are ``bench/_timing.py``'s. The two servers run alternately in
short windows (A B A B ..., every body and concurrency in each round); requests/s, CPU per request and
requests per forward pass are medians over rounds, p50/p99 are over all requests of a cell.

Requests per forward pass come from ``/metrics``: the ``_sum`` and ``_count`` of the histogram
``calibserve_predict_batch_requests``, read before and after each window. Each window first sends one
warm-up request per connection, one after the other, so each of those is a forward pass of its own; they
are subtracted (``concurrency`` from both the sum and the count) and what remains is the window's load.

Bounded: at most ``--max-requests`` per window (default 10,000), 2 bodies x 2 servers x ``--rounds`` x
the concurrencies windows; the default run (5 rounds of 2 s windows) takes about 2.5 minutes.

Usage: ``.venv/bin/python bench/bench_batching.py [--rounds 5] [--window 2.0] [--concurrency 1 8 64]
[--max-requests 10000] [--write] [--readme PATH]``. ``--write`` replaces the ``bench_batching`` section
of ``bench/README.md`` (or of ``--readme``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402
from bench_server import (  # noqa: E402
    RUN,
    Case,
    _window,
    cpu_seconds,
    free_port,
    http_request,
    npy_bytes,
    percentile,
    start,
    stop,
    sum_window,
    wait_http,
)

MODEL = "digits-mlp"
PATH = f"/v1/models/{MODEL}/predict"
SERVERS = ("off", "on")  # A, B: the order of every round
BODIES = ("JSON", ".npy")
METRIC = "calibserve_predict_batch_requests"


@dataclass
class BatchCase(Case):
    """A :class:`bench_server.Case` for one server, body and concurrency, with its batch sizes per window."""

    body: str = ""
    concurrency: int = 1
    requests_per_pass: list[float] = field(default_factory=list)
    unaccounted: int = 0  # answered requests the batch histogram did not see (should stay 0)


def bodies() -> dict[str, bytes]:
    """The two 1-row requests: the first test row as JSON and as ``.npy``."""
    row = np.load(REPO / "models" / MODEL / "test.npz")["inputs"][:1].astype(np.float32)
    as_json = orjson.dumps({"inputs": row}, option=orjson.OPT_SERIALIZE_NUMPY)
    return {
        "JSON": http_request("POST", PATH, as_json, {"Content-Type": "application/json"}),
        ".npy": http_request(
            "POST", PATH, npy_bytes(row), {"Content-Type": "application/x-npy", "X-Tensor-Name": "inputs"}
        ),
    }


def batch_totals(client: httpx.Client) -> tuple[float, float]:
    """``(sum, count)`` of the batch-requests histogram: requests served, forward passes run."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in (f"{METRIC}_sum", f"{METRIC}_count"):
            values[name] = float(value)
    return values.get(f"{METRIC}_sum", 0.0), values.get(f"{METRIC}_count", 0.0)


def measure(case: BatchCase, port: int, pid: int, client: httpx.Client, args: argparse.Namespace) -> None:
    """One window of ``case``: rate, CPU per request, latencies and requests per forward pass."""
    served_before, passes_before = batch_totals(client)
    cpu_before = cpu_seconds(pid)
    latencies, errors = RUN(_window(port, case.raw, case.concurrency, args.window, args.max_requests))
    used = cpu_seconds(pid) - cpu_before
    served_after, passes_after = batch_totals(client)
    case.samples_per_s.append(len(latencies) / sum_window(latencies, case.concurrency, args.window))
    case.cpu_per_request.append(used / max(len(latencies), 1))
    case.latencies += latencies
    case.errors += errors
    served = served_after - served_before - case.concurrency
    passes = passes_after - passes_before - case.concurrency
    if case.server == "on":
        case.unaccounted += len(latencies) - round(served)
        if passes > 0:
            case.requests_per_pass.append(served / passes)
    elif passes_after > passes_before:
        case.unaccounted += round(passes_after - passes_before)  # the unbatched server used the batcher


def serve(port: int, store: str, batch_max_size: int, args: argparse.Namespace):
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--store-dir", store]
    command += ["--models-dir", str(REPO / "models"), "--workers", "1"]
    env = {
        "CALIBSERVE_LOG_LEVEL": "warning",
        "CALIBSERVE_DEVICE": "cpu",
        "CALIBSERVE_BATCH_MAX_SIZE": str(batch_max_size),
        "CALIBSERVE_BATCH_MAX_DELAY_MS": str(args.batch_max_delay_ms),
    }
    return start(command, env)


def run(args: argparse.Namespace) -> list[BatchCase]:
    raw = bodies()
    store = tempfile.mkdtemp(prefix="calibserve-bench-batching-")
    ports = {server: free_port() for server in SERVERS}
    sizes = {"off": 0, "on": args.batch_max_size}
    processes = {}
    clients: dict[str, httpx.Client] = {}
    try:
        for server in SERVERS:
            processes[server] = serve(ports[server], os.path.join(store, server), sizes[server], args)
        for server in SERVERS:
            wait_http(ports[server], "/readyz")
            clients[server] = httpx.Client(base_url=f"http://127.0.0.1:{ports[server]}", timeout=30)
            for body in BODIES:  # load the model, fill the caches: untimed
                RUN(_window(ports[server], raw[body], 8, min(args.window, 0.3), args.max_requests))
        cases = [
            BatchCase(
                f"{body} c{concurrency} {server}", server, raw[body], body=body, concurrency=concurrency
            )
            for concurrency in args.concurrency
            for body in BODIES
            for server in SERVERS
        ]
        for concurrency in args.concurrency:
            for round_index in range(args.rounds):
                for case in cases:
                    if case.concurrency == concurrency:
                        server = case.server
                        measure(case, ports[server], processes[server].pid, clients[server], args)
                print(
                    f"concurrency {concurrency}: round {round_index + 1}/{args.rounds} done", file=sys.stderr
                )
        return cases
    finally:
        for client in clients.values():
            client.close()
        for process in processes.values():
            stop(process)
        shutil.rmtree(store, ignore_errors=True)


# --------------------------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def summary(case: BatchCase) -> dict[str, float]:
    return {
        "rate": statistics.median(case.samples_per_s),
        "p50": percentile(case.latencies, 0.5),
        "p99": percentile(case.latencies, 0.99),
        "cpu": statistics.median(case.cpu_per_request),
        "per_pass": statistics.median(case.requests_per_pass) if case.requests_per_pass else float("nan"),
    }


def table(cases: list[BatchCase]) -> tuple[str, dict[tuple[str, int], tuple[dict, dict]]]:
    """The side-by-side table (off | on per body and concurrency) and the summaries it shows."""
    pairs: dict[tuple[str, int], dict[str, BatchCase]] = {}
    for case in cases:
        pairs.setdefault((case.body, case.concurrency), {})[case.server] = case
    rows, shown = [], {}
    for (body, concurrency), pair in pairs.items():
        off, on = summary(pair["off"]), summary(pair["on"])
        shown[body, concurrency] = off, on
        rows.append(
            [
                f"1-row {body}",
                concurrency,
                f"{off['rate']:,.0f}",
                f"{on['rate']:,.0f}",
                f"{on['rate'] / off['rate']:.2f}",
                _ms(off["p50"]),
                _ms(on["p50"]),
                _ms(off["p99"]),
                _ms(on["p99"]),
                f"{off['cpu'] * 1e6:,.0f}",
                f"{on['cpu'] * 1e6:,.0f}",
                f"{on['per_pass']:.2f}",
                f"{pair['off'].errors} / {pair['on'].errors}",
            ]
        )
    headers = [
        "body",
        "concurrency",
        "req/s off",
        "req/s on",
        "on/off",
        "p50 ms off",
        "p50 ms on",
        "p99 ms off",
        "p99 ms on",
        "CPU us/req off",
        "CPU us/req on",
        "requests per forward pass (on)",
        "non-200 off / on",
    ]
    return markdown_table(headers, rows), shown


def reading(shown: dict[tuple[str, int], tuple[dict, dict]], args: argparse.Namespace) -> str:
    """Two or three sentences on what the numbers say, written from the numbers of this run."""
    low, high = min(args.concurrency), max(args.concurrency)
    sentences = []
    if ("JSON", high) in shown and ("JSON", low) in shown and high != low:
        off, on = shown["JSON", high]
        sentences.append(
            f"At concurrency {high} with 1-row JSON bodies each forward pass of the batching server served "
            f"{on['per_pass']:.1f} requests (median of rounds), and requests/s went from {off['rate']:,.0f} "
            f"to {on['rate']:,.0f} ({on['rate'] / off['rate']:.2f}x), p50 from {_ms(off['p50'])} to "
            f"{_ms(on['p50'])} ms and server CPU per request from {off['cpu'] * 1e6:,.0f} to "
            f"{on['cpu'] * 1e6:,.0f} us."
        )
        off, on = shown["JSON", low]
        sentences.append(
            f"At concurrency {low} there is nothing to gather ({on['per_pass']:.2f} requests per pass): "
            f"every request waits for the {args.batch_max_delay_ms:g} ms delay alone, and p50 went from "
            f"{_ms(off['p50'])} to {_ms(on['p50'])} ms, server CPU per request from {off['cpu'] * 1e6:,.0f} "
            f"to {on['cpu'] * 1e6:,.0f} us."
        )
    busy = [shown[body, high] for body in BODIES if (body, high) in shown]
    paid_off = high > 1 and all(
        on["rate"] > 1.1 * off["rate"] and on["cpu"] < 0.9 * off["cpu"] for off, on in busy
    )
    gpu = (
        "This machine has no GPU (both servers ran with `CALIBSERVE_DEVICE=cpu`) and no GPU figures are given"
    )
    if paid_off:
        sentences.append(
            f"{gpu}. On this CPU a lone caller gains nothing from batching, but under concurrency {high} "
            "the fewer forward passes also cost less server CPU per request for both bodies (the per-pass work "
            "around the model, such as the thread-pool hand-off, the tensor conversion and the output checks, "
            "is paid once per batch), and requests/s rose with it."
        )
    else:
        sentences.append(f"{gpu}: on a CPU batching mainly trades latency for fewer forward passes.")
    return " ".join(sentences)


def command_line(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python bench/bench_batching.py --rounds {args.rounds} --window {args.window:g} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --max-requests {args.max_requests} "
        f"--batch-max-size {args.batch_max_size} --batch-max-delay-ms {args.batch_max_delay_ms:g} --write"
    )


def report(cases: list[BatchCase], args: argparse.Namespace, info: dict[str, str], wall_s: float) -> str:
    text, shown = table(cases)
    unaccounted = sum(case.unaccounted for case in cases)
    check = (
        "Every answered request of the batching server was counted by the batch histogram, and the "
        "unbatched server never used the batcher."
        if unaccounted == 0
        else f"Warning: {unaccounted} requests were not accounted for by the batch histogram."
    )
    return "\n".join(
        [
            "## Dynamic batching of /predict (`bench/bench_batching.py`)",
            "",
            f"Command: `{command_line(args)}` (wall time {wall_s:.0f} s). Two `calibserve serve` processes, "
            f"one uvicorn worker each, on 127.0.0.1 with `CALIBSERVE_DEVICE=cpu`, serving the shipped "
            f"TorchScript model `{MODEL}` (64 float32 inputs -> 10 logits, no calibrator): off "
            f"(`CALIBSERVE_BATCH_MAX_SIZE=0`) and on (`CALIBSERVE_BATCH_MAX_SIZE={args.batch_max_size}`, "
            f"`CALIBSERVE_BATCH_MAX_DELAY_MS={args.batch_max_delay_ms:g}`). `POST {PATH}` with the first row "
            "of `test.npz` as JSON or as `.npy` (`X-Tensor-Name: inputs`). Load generator, CPU accounting and "
            "process handling are `bench_server.py`'s; it shares the "
            f"{info['nproc']} cores with both servers. The servers ran alternately in {args.window:g} s "
            f"windows (off, on, off, on, ...; {args.rounds} rounds, at most {args.max_requests:,} requests "
            "per window); req/s, CPU per request and requests per forward pass are medians over rounds, "
            "p50/p99 over all requests of a cell. Requests per forward pass: difference of "
            f"`{METRIC}` `_sum` / `_count` in `/metrics` before and after each window, less the one "
            "warm-up request per connection. " + check,
            "",
            text,
            "",
            reading(shown, args),
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=2.0, help="seconds per server, body and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-requests", type=int, default=10_000, help="per window")
    parser.add_argument("--batch-max-size", type=int, default=64, help="of the batching server")
    parser.add_argument("--batch-max-delay-ms", type=float, default=2.0, help="of the batching server")
    parser.add_argument("--write", action="store_true", help="write the section into the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info({"torch": importlib.metadata.version("torch")})
    cases = run(args)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    text = report(cases, args, info, time.perf_counter() - started)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_batching", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
