"""The Open Inference Protocol over gRPC: calibserve's ModelInfer against its HTTP binary path and against
Triton's own gRPC endpoint, on the same logits-only model.

Starts a real Triton Inference Server (``tests/triton/serve.py``: PyTriton, ``.venv-triton``) serving
``identity10`` and ``identity1000`` (``x`` FP32 [K] -> ``logits`` = x, up to 64 rows a call), and one
``calibserve serve --grpc-port P`` (one uvicorn worker, an empty models directory,
``CALIBSERVE_LOG_LEVEL=warning``) with logits-only models ``identity10`` and ``identity1000`` whose temperature
is fitted on 2,000 rows (logits ``3 N(0, 1)``, labels drawn from ``softmax(logits / 2)``). Three sides, each
asked for one output of the same rows:

- ``calibserve gRPC``: ``ModelInfer`` on calibserve's gRPC port, input ``logits`` (raw contents), output
  ``probabilities``;
- ``calibserve HTTP binary``: ``POST /v2/models/identity{K}/infer`` with binary tensor data for the input
  and the output (the fastest HTTP form);
- ``Triton gRPC``: ``ModelInfer`` on Triton's gRPC port, input ``x``, output ``logits`` (no calibration: the
  floor a user's Triton call costs).

Load: the asyncio clients of ``tritonclient`` (``tritonclient.grpc.aio``, ``tritonclient.http.aio``) in one
event loop of this process, C tasks per side each calling ``infer`` in a closed loop (the next request when
the previous answer is parsed); inputs and requested outputs are built once per cell. One answer of each side
is checked before a cell: Triton's logits equal x, calibserve's probabilities equal softmax(x / T) on both
protocols. The client, calibserve and Triton share the machine's cores.

Interleaving: ``--rounds`` windows per side and cell, the sides' order reversed every round (ABC, CBA, ...),
``--seconds`` per side in all. requests/s are medians over the windows; p50/p99 over all requests of a side.

Usage: ``.venv/bin/python bench/bench_grpc.py [--seconds 2] [--rounds 2] [--concurrency 1 8 64]
[--sizes 1x10 64x1000] [--write] [--readme PATH] [--json PATH]``. ``--write`` replaces the ``bench_grpc``
section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402
from bench_server import free_port, percentile, start, stop, wait_http  # noqa: E402

from tests.helpers.triton import TritonServer, start_triton  # noqa: E402

MODELS = {10: "identity10", 1000: "identity1000"}
SIDES = ("calibserve gRPC", "calibserve HTTP binary", "Triton gRPC")
FIT_ROWS = 2000
FIT_TEMPERATURE = 2.0


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def serve_calibserve(http_port: int, grpc_port: int, root: Path):
    (root / "models").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "service", "serve", "--port", str(http_port), "--workers", "1"]
    command += ["--grpc-port", str(grpc_port)]
    command += ["--store-dir", str(root / "store"), "--models-dir", str(root / "models")]
    return start(command, {"CALIBSERVE_LOG_LEVEL": "warning"})


def prepare_models(url: str, classes: list[int]) -> dict[int, float]:
    """A logits-only model per class count, with a temperature fitted on labels drawn at T = 2."""
    rng = np.random.default_rng(1)
    fitted = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for k in classes:
            client.put(f"/v1/models/{MODELS[k]}", json={"num_classes": k}).raise_for_status()
            logits = (rng.normal(size=(FIT_ROWS, k)) * 3).astype(np.float32)
            p = softmax(logits / FIT_TEMPERATURE)
            labels = (p.cumsum(axis=1) < rng.random((FIT_ROWS, 1))).sum(axis=1).clip(max=k - 1)
            answer = client.post(
                f"/v1/models/{MODELS[k]}/fit", json={"logits": logits.tolist(), "labels": labels.tolist()}
            )
            answer.raise_for_status()
            fitted[k] = float(answer.json()["temperature"])
    return fitted


@dataclass
class Side:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


@dataclass
class Cell:
    rows: int
    classes: int
    concurrency: int
    sides: dict[str, Side] = field(default_factory=lambda: {side: Side() for side in SIDES})

    @property
    def size(self) -> str:
        return f"{self.rows} x {self.classes}"


Call = Callable[[], Awaitable[object]]


async def window(call: Call, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    """C tasks calling ``call`` in a closed loop for ``seconds``: (latencies, errors, elapsed)."""
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    deadline = clock() + seconds

    async def caller() -> None:
        nonlocal errors
        while clock() < deadline:
            began = clock()
            try:
                await call()
            except Exception:  # a failed call counts, and the loop goes on
                errors += 1
            latencies.append(clock() - began)

    began = clock()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors, clock() - began


async def measure_cell(cell: Cell, targets: dict[str, str], temperature: float, args) -> None:
    x = (
        np.random.default_rng(cell.rows * 7 + cell.classes).normal(size=(cell.rows, cell.classes)) * 3
    ).astype(np.float32)
    model = MODELS[cell.classes]
    grpc_client = grpc_aio.InferenceServerClient(targets["calibserve gRPC"])
    http_client = http_aio.InferenceServerClient(
        targets["calibserve HTTP binary"], conn_limit=cell.concurrency
    )
    triton_client = grpc_aio.InferenceServerClient(targets["Triton gRPC"])
    try:
        logits_in = grpc_aio.InferInput("logits", list(x.shape), "FP32")
        logits_in.set_data_from_numpy(x)
        probabilities_out = [grpc_aio.InferRequestedOutput("probabilities")]
        http_in = http_aio.InferInput("logits", list(x.shape), "FP32")
        http_in.set_data_from_numpy(x, binary_data=True)
        http_out = [http_aio.InferRequestedOutput("probabilities", binary_data=True)]
        x_in = grpc_aio.InferInput("x", list(x.shape), "FP32")
        x_in.set_data_from_numpy(x)
        logits_out = [grpc_aio.InferRequestedOutput("logits")]
        calls: dict[str, Call] = {
            "calibserve gRPC": lambda: grpc_client.infer(model, [logits_in], outputs=probabilities_out),
            "calibserve HTTP binary": lambda: http_client.infer(model, [http_in], outputs=http_out),
            "Triton gRPC": lambda: triton_client.infer(model, [x_in], outputs=logits_out),
        }
        expected = softmax(x / temperature)
        for side in SIDES[:2]:
            answer = await calls[side]()
            np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal((await calls["Triton gRPC"]()).as_numpy("logits"), x)
        for side in SIDES:  # warm-up: untimed
            await window(calls[side], cell.concurrency, min(0.2, args.seconds / args.rounds))
        for index in range(args.rounds):
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                latencies, errors, elapsed = await window(
                    calls[side], cell.concurrency, args.seconds / args.rounds
                )
                record = cell.sides[side]
                record.rates.append(len(latencies) / elapsed)
                record.latencies += latencies
                record.errors += errors
    finally:
        await grpc_client.close()
        await http_client.close()
        await triton_client.close()


def run(args: argparse.Namespace) -> tuple[list[Cell], dict]:
    sizes = [tuple(int(part) for part in size.split("x")) for size in args.sizes]
    classes = sorted({k for _, k in sizes})
    root = Path(tempfile.mkdtemp(prefix="calibserve-bench-grpc-"))
    triton: TritonServer | None = None
    server = None
    try:
        triton = start_triton(models=tuple(MODELS[k] for k in classes))
        http_port, grpc_port = free_port(), free_port()
        server = serve_calibserve(http_port, grpc_port, root)
        wait_http(http_port, "/readyz")
        temperatures = prepare_models(f"http://127.0.0.1:{http_port}", classes)
        targets = {
            "calibserve gRPC": f"127.0.0.1:{grpc_port}",
            "calibserve HTTP binary": f"127.0.0.1:{http_port}",
            "Triton gRPC": f"127.0.0.1:{triton.grpc_port}",
        }
        with httpx.Client(timeout=10) as client:
            triton_version = client.get(triton.url + "/v2").json().get("version", "?")
        cells = [Cell(rows, k, c) for c in args.concurrency for rows, k in sizes]
        for number, cell in enumerate(cells, 1):
            asyncio.run(measure_cell(cell, targets, temperatures[cell.classes], args))
            print(f"[{number}/{len(cells)}] {cell.size} c{cell.concurrency} done", file=sys.stderr)
        return cells, {"temperatures": temperatures, "triton_version": triton_version}
    finally:
        if server is not None:
            stop(server)
        if triton is not None:
            triton.close()
        shutil.rmtree(root, ignore_errors=True)


def figures(cell: Cell) -> dict:
    out: dict = {"size": cell.size, "concurrency": cell.concurrency}
    for side, record in cell.sides.items():
        out[side] = {
            "requests_per_s": statistics.median(record.rates) if record.rates else 0.0,
            "p50_s": percentile(record.latencies, 0.50),
            "p99_s": percentile(record.latencies, 0.99),
            "requests": len(record.latencies),
            "errors": record.errors,
        }
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(rows: list[dict], context: dict, args: argparse.Namespace, info: dict, wall_s: float) -> str:
    header = ["size", "C"]
    for side in SIDES:
        header += [f"{side} req/s", "p50 ms", "p99 ms"]
    header += ["gRPC / HTTP"]
    table = []
    verdicts = []
    for row in rows:
        line = [row["size"], str(row["concurrency"])]
        for side in SIDES:
            figures_of = row[side]
            errors = f" ({figures_of['errors']} errors)" if figures_of["errors"] else ""
            line += [
                f"{figures_of['requests_per_s']:,.0f}{errors}",
                _ms(figures_of["p50_s"]),
                _ms(figures_of["p99_s"]),
            ]
        grpc_rate = row["calibserve gRPC"]["requests_per_s"]
        http_rate = row["calibserve HTTP binary"]["requests_per_s"]
        ratio = grpc_rate / http_rate if http_rate else float("nan")
        line.append(f"{ratio:.2f}x")
        table.append(line)
        if row["size"] == "64 x 1000":
            verdicts.append(f"C={row['concurrency']}: {ratio:.2f}x ({'met' if ratio >= 1 else 'missed'})")
    temperatures = ", ".join(f"{MODELS[k]} T = {t:.3f}" for k, t in sorted(context["temperatures"].items()))
    command = (
        f".venv/bin/python bench/bench_grpc.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --sizes {' '.join(args.sizes)} --write"
    )
    return "\n".join(
        [
            "## Open Inference Protocol over gRPC (`bench/bench_grpc.py`)",
            "",
            f"Command: `{command}` (wall time {wall_s:.0f} s). One `calibserve serve --grpc-port` (one uvicorn "
            f"worker) with logits-only models `identity10` and `identity1000` ({temperatures}), and a real Triton "
            f"{context['triton_version']} (PyTriton, CPU) serving `identity10` / `identity1000` (`x` -> `logits` "
            "= x). Sides: calibserve's `ModelInfer` over gRPC (input `logits` as raw contents, output "
            "`probabilities`); calibserve's `/v2/models/{name}/infer` over HTTP with binary tensor data; Triton's "
            "own gRPC `ModelInfer` (output `logits`, nothing calibrated). Clients: `tritonclient.grpc.aio` and "
            "`tritonclient.http.aio` in one event loop, C tasks per side in closed loops; one answer of each side "
            "checked before every cell. **Client, calibserve and Triton share the same "
            f"{info['nproc']} cores.** Sides interleaved per cell ({args.rounds} windows of "
            f"{args.seconds / args.rounds:g} s per side, order reversed every round); req/s are medians over the "
            "windows, p50/p99 over all of a side's requests. A short run: the figures move with the machine's "
            "other load.",
            "",
            markdown_table(header, table),
            "",
            "Target: calibserve's gRPC at least as fast as its HTTP binary path for 64 x 1000: "
            + "; ".join(verdicts)
            + ".",
            "",
            "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and cell, in all")
    parser.add_argument("--rounds", type=int, default=2, help="windows per side and cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--sizes", nargs="+", default=["1x10", "64x1000"], help="ROWSxCLASSES (10 or 1000)")
    parser.add_argument("--write", action="store_true", help="write the section into the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info({"tritonclient": importlib.metadata.version("tritonclient")})
    cells, context = run(args)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    rows = [figures(cell) for cell in cells]
    wall_s = time.perf_counter() - started
    text = report(rows, context, args, info, wall_s)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"cells": rows, "wall_s": wall_s, "machine": info}, indent=2))
    if args.write:
        replace_section(args.readme, "bench_grpc", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
