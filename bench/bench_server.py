"""Load benchmark of the sidecar hot path over real HTTP (issue #5, "Measure").

Starts ``python -m service serve`` (real uvicorn, one worker, on 127.0.0.1) and, as the baseline, this
file's own naive app (:data:`naive_app`: a plain FastAPI endpoint with a pydantic ``list[list[float]]``
body, doing the same temperature scaling and answering JSON) in a second uvicorn process. Then, in one
run, it measures requests/s, p50 and p99 latency and the server's CPU time per request at concurrency 1,
8 and 64 for:

- ``GET /healthz`` (the ceiling: the cheapest route through the same app and middleware);
- ``POST /v1/models/{name}/calibrate`` with 1 x 10, 1 x 1000 and 64 x 1000 float32 logits as JSON,
  ``.npy`` and raw float32 (``X-Tensor-Shape``), answered in the same type;
- ``POST /v2/models/{name}/infer`` (Open Inference Protocol) as JSON and as binary tensor data;
- the naive endpoint on the same three sizes.

The load generator is a small asyncio client on raw keep-alive sockets (uvloop when installed), one
connection per unit of concurrency, each sending its next request when the previous answer is complete.
It shares the machine's cores with the server, so absolute numbers are lower than a separate load host
would see; ratios from the same run are what the targets are about. Cases run in rounds (every case once
per round, in the same order: A B C ..., A B C ...), each for a short window; requests/s and CPU per
request are medians over rounds, latency percentiles are over all of a case's requests. Server CPU time
is ``utime + stime`` from ``/proc/<pid>/stat`` before and after each window.

Usage: ``.venv/bin/python bench/bench_server.py [--rounds 3] [--window 1.0] [--concurrency 1 8 64]
[--write]``. ``--write`` replaces the ``bench_server`` section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402

from tests.helpers.ports import free_port  # noqa: E402  (one allocator for tests and benches)

try:
    import uvloop

    RUN = uvloop.run
except ImportError:  # pragma: no cover
    RUN = asyncio.run

TEMPERATURE = 1.7
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# ------------------------------------------------------------------------------------------ naive app
# What a user would write without calibserve: pydantic parses every float, FastAPI's encoder answers.

try:
    from fastapi import FastAPI
    from pydantic import BaseModel

    class _NaiveRequest(BaseModel):
        logits: list[list[float]]

    naive_app = FastAPI()

    @naive_app.post("/calibrate")
    def _naive_calibrate(body: _NaiveRequest) -> dict:
        z = np.asarray(body.logits, dtype=np.float64) / TEMPERATURE
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return {"probabilities": p.tolist(), "predicted_class": p.argmax(axis=1).tolist()}

except ImportError:  # pragma: no cover - the bench needs the project's environment
    naive_app = None


# ------------------------------------------------------------------------------------------- processes


def wait_http(port: int, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 200 on port {port}{path}")


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **env}, start_new_session=True, stdout=subprocess.DEVNULL
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its children that are still running (uvicorn with one worker: itself)."""
    total = 0
    for task in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    found = [int(part) for part in text.split()]
    return found + [grandchild for child in found for grandchild in children(child)]


# --------------------------------------------------------------------------------------------- client


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a request and waits for the whole answer."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.needed = -1
        self.status = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.needed < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            self.status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            self.needed = end + 4 + length
        if len(self.buffer) >= self.needed and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.status)

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def request(self, raw: bytes) -> int:
        self.buffer.clear()
        self.needed = -1
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(raw)
        return await self.waiter


async def _window(
    port: int, raw: bytes, concurrency: int, seconds: float, limit: int
) -> tuple[list[float], int]:
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        connections.append(protocol)
    for connection in connections:  # warm each connection once, outside the window
        await connection.request(raw)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(connection: _Connection) -> None:
        nonlocal errors
        while time.perf_counter() < deadline and len(latencies) < limit:
            started = time.perf_counter()
            status = await connection.request(raw)
            latencies.append(time.perf_counter() - started)
            errors += status != 200

    await asyncio.gather(*(worker(connection) for connection in connections))
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    return latencies, errors


# ---------------------------------------------------------------------------------------------- cases


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@dataclass
class Case:
    name: str
    server: str  # "service" or "naive"
    raw: bytes
    samples_per_s: list[float] = field(default_factory=list)
    cpu_per_request: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def make_cases(sizes: list[tuple[int, int]], only: list[str] | None = None) -> list[Case]:
    cases = _all_cases(sizes)
    if only:
        cases = [case for case in cases if any(part in case.name for part in only)]
    return cases


def _all_cases(sizes: list[tuple[int, int]]) -> list[Case]:
    rng = np.random.default_rng(0)
    cases = [Case("healthz", "service", http_request("GET", "/healthz"))]
    for rows, columns in sizes:
        logits = (rng.normal(size=(rows, columns)) * 3).astype(np.float32)
        model = f"k{columns}"
        path = f"/v1/models/{model}/calibrate"
        label = f"{rows}x{columns}"
        as_json = orjson.dumps({"logits": logits}, option=orjson.OPT_SERIALIZE_NUMPY)
        cases += [
            Case(
                f"calibrate {label} JSON",
                "service",
                http_request("POST", path, as_json, {"Content-Type": "application/json"}),
            ),
            Case(
                f"calibrate {label} .npy",
                "service",
                http_request("POST", path, npy_bytes(logits), {"Content-Type": "application/x-npy"}),
            ),
            Case(
                f"calibrate {label} raw f32",
                "service",
                http_request(
                    "POST",
                    path,
                    logits.tobytes(),
                    {"Content-Type": "application/octet-stream", "X-Tensor-Shape": f"{rows},{columns}"},
                ),
            ),
        ]
        tensor = {"name": "logits", "shape": [rows, columns], "datatype": "FP32"}
        oip_json = orjson.dumps(
            {"inputs": [{**tensor, "data": logits.reshape(-1)}]}, option=orjson.OPT_SERIALIZE_NUMPY
        )
        header = orjson.dumps(
            {
                "inputs": [{**tensor, "parameters": {"binary_data_size": logits.nbytes}}],
                "parameters": {"binary_data_output": True},
            }
        )
        infer = f"/v2/models/{model}/infer"
        cases += [
            Case(
                f"OIP infer {label} JSON",
                "service",
                http_request("POST", infer, oip_json, {"Content-Type": "application/json"}),
            ),
            Case(
                f"OIP infer {label} binary",
                "service",
                http_request(
                    "POST",
                    infer,
                    header + logits.tobytes(),
                    {
                        "Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(len(header)),
                    },
                ),
            ),
            Case(
                f"naive pydantic {label} JSON",
                "naive",
                http_request(
                    "POST",
                    "/calibrate",
                    orjson.dumps({"logits": logits.tolist()}),
                    {"Content-Type": "application/json"},
                ),
            ),
        ]
    return cases


def set_up_models(port: int, sizes: list[tuple[int, int]]) -> None:
    """A logits-only model per class count, each with an active temperature calibrator."""
    import httpx

    rng = np.random.default_rng(1)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for columns in sorted({columns for _, columns in sizes}):
            model = f"k{columns}"
            client.put(f"/v1/models/{model}", json={"num_classes": columns}).raise_for_status()
            logits = rng.normal(size=(2000, columns)) * 3
            labels = np.where(rng.random(2000) < 0.6, logits.argmax(axis=1), rng.integers(0, columns, 2000))
            fitted = client.post(
                f"/v1/models/{model}/fit", json={"logits": logits.tolist(), "labels": labels.tolist()}
            )
            fitted.raise_for_status()


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> str:
    sizes = [(1, 10), (1, 1000), (64, 1000)]
    store = tempfile.mkdtemp(prefix="calibserve-bench-")
    service_port, naive_port = free_port(), free_port()
    env = {"CALIBSERVE_LOG_LEVEL": "warning", "CALIBSERVE_DEVICE": "cpu"}
    service = start(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--port",
            str(service_port),
            "--store-dir",
            store,
            "--models-dir",
            str(REPO / "models"),
        ],
        env,
    )
    naive = start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench_server:naive_app",
            "--app-dir",
            str(HERE),
            "--port",
            str(naive_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env,
    )
    try:
        wait_http(service_port, "/readyz")
        wait_http(naive_port, "/openapi.json")
        set_up_models(service_port, sizes)
        cases = make_cases(sizes, args.cases)
        pids = {"service": service.pid, "naive": naive.pid}
        ports = {"service": service_port, "naive": naive_port}
        results: dict[int, list[Case]] = {}
        for concurrency in args.concurrency:
            fresh = make_cases(sizes, args.cases) if concurrency != args.concurrency[0] else cases
            for round_index in range(args.rounds):
                for case in fresh:
                    pid = pids[case.server]
                    before = cpu_seconds(pid)
                    latencies, errors = RUN(
                        _window(ports[case.server], case.raw, concurrency, args.window, args.max_requests)
                    )
                    used = cpu_seconds(pid) - before
                    case.samples_per_s.append(
                        len(latencies) / sum_window(latencies, concurrency, args.window)
                    )
                    case.cpu_per_request.append(used / max(len(latencies), 1))
                    case.latencies += latencies
                    case.errors += errors
                print(
                    f"concurrency {concurrency}: round {round_index + 1}/{args.rounds} done", file=sys.stderr
                )
            results[concurrency] = fresh
        return report(results, args)
    finally:
        stop(service)
        stop(naive)


def sum_window(latencies: list[float], concurrency: int, window: float) -> float:
    """The window's length: the set window, or longer when the last requests ran past it."""
    return max(window, sum(latencies) / max(concurrency, 1))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(results: dict[int, list[Case]], args: argparse.Namespace) -> str:
    rows = []
    medians: dict[tuple[str, int], float] = {}
    for concurrency, cases in results.items():
        for case in cases:
            rate = statistics.median(case.samples_per_s)
            medians[case.name, concurrency] = rate
            rows.append(
                [
                    case.name,
                    concurrency,
                    f"{rate:,.0f}",
                    f"{percentile(case.latencies, 0.5) * 1e3:.2f}",
                    f"{percentile(case.latencies, 0.99) * 1e3:.2f}",
                    f"{statistics.median(case.cpu_per_request) * 1e6:,.0f}",
                    case.errors,
                ]
            )
    table = markdown_table(
        ["case", "concurrency", "req/s (median)", "p50 ms", "p99 ms", "server CPU us/req", "non-200"], rows
    )
    checks = []
    targets = [
        ("1x10 JSON calibrate / healthz", "calibrate 1x10 JSON", "healthz", 0.75, "{:.2f}"),
        ("64x1000 raw / naive", "calibrate 64x1000 raw f32", "naive pydantic 64x1000 JSON", 25.0, "{:.1f}x"),
        ("64x1000 .npy / naive", "calibrate 64x1000 .npy", "naive pydantic 64x1000 JSON", 25.0, "{:.1f}x"),
        (
            "64x1000 OIP binary / naive",
            "OIP infer 64x1000 binary",
            "naive pydantic 64x1000 JSON",
            25.0,
            "{:.1f}x",
        ),
        ("64x1000 JSON / naive", "calibrate 64x1000 JSON", "naive pydantic 64x1000 JSON", 3.0, "{:.1f}x"),
    ]
    for concurrency in results:
        parts = []
        for label, case, base, target, shown in targets:
            if (case, concurrency) in medians and (base, concurrency) in medians:
                value = medians[case, concurrency] / medians[base, concurrency]
                verdict = "meets" if value >= target else "misses"
                parts.append(f"{label} = {shown.format(value)} ({verdict} >= {shown.format(target)})")
        if parts:
            checks.append(f"- concurrency {concurrency}: " + "; ".join(parts))
    for case in results.get(8, []):
        if case.name == "calibrate 1x1000 JSON":
            p99 = percentile(case.latencies, 0.99) * 1e3
            verdict = "meets" if p99 < 10 else "misses"
            checks.append(f"- p99 at concurrency 8 for 1x1000 JSON: {p99:.2f} ms ({verdict} < 10 ms)")
    info = machine_info()
    command = (
        f".venv/bin/python bench/bench_server.py --rounds {args.rounds} --window {args.window} "
        f"--concurrency {' '.join(map(str, args.concurrency))}"
    )
    return "\n".join(
        [
            "## Sidecar: HTTP load on the calibrate path (`bench/bench_server.py`)",
            "",
            f"Command: `{command} --write`. One uvicorn worker (uvloop + httptools) on 127.0.0.1; the naive "
            "baseline is a plain FastAPI endpoint with a pydantic `list[list[float]]` body in a second uvicorn "
            "process; float32 logits, an active temperature calibrator. The load generator (asyncio, raw "
            "keep-alive sockets) shares the same "
            f"{info['nproc']} cores with the server, so absolute rates are lower than from a separate load "
            "host. Rates and CPU are medians over rounds (cases interleaved A B C ..., A B C ...); p50/p99 over "
            "all requests of a case. Other jobs share the machine (see the load average below): tails include "
            "their scheduling, so read each p99 against the p99 of /healthz in the same run.",
            "",
            table,
            "",
            "Targets (ratios from this run):",
            "",
            *checks,
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=1.0, help="seconds per case and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-requests", type=int, default=50_000, help="per window")
    parser.add_argument(
        "--cases", nargs="+", help="only cases whose name contains one of these (quick looks)"
    )
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write:
        replace_section(HERE / "README.md", "bench_server", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
