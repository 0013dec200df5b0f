"""Cold start and memory of a logits-only calibserve, of the proxy deployment, and of the TorchScript example.

Starts ``python -m service serve`` (one uvicorn worker, 127.0.0.1) ``--runs`` times (default 5) in each of
three deployments, interleaved (the order rotates from one repetition to the next):

- logits-only: ``--models-dir <empty dir> --store-dir <store>``: calibrates logits that clients send;
- proxy: the same with ``--upstream <Triton>``, a real Triton Inference Server (``tests/triton/serve.py``,
  started once) serving ``identity10`` (``x`` FP32 [10] -> ``logits`` = x);
- TorchScript: ``--models-dir models``, the shipped example ``digits-mlp`` (its registry imports torch).

Each start gets a fresh copy of a store made beforehand by a server of the same kind (a temperature fitted for
the logits-only model ``m``, 10 classes, and for the proxy's ``identity10``), as a restarted deployment finds
it. Measured per start: the wall time from ``Popen`` to the first 200 of ``GET /readyz`` (polled every 5 ms, a
raw socket per poll), for TorchScript also to the first ``/readyz`` that lists no pending model; then one
calibrate request (``POST /v1/models/m/calibrate``, 1 x 10 JSON), for the proxy one calibrated V2 infer through
Triton (``POST /v2/models/identity10/infer``, 1 x 10 JSON, answered ``probabilities``), for TorchScript one
predict (``POST /v1/models/digits-mlp/predict``, one row); then the worker's RSS (``VmRSS`` of
``/proc/<pid>/status``) and whether torch's library is mapped (``libtorch`` in ``/proc/<pid>/maps``). On the
logits-only server, two temperature fits follow (``POST /v1/models/m/fit``, 1,000 x 10 JSON logits): the
first imports torch, the second finds it loaded; then the RSS again.

Usage: ``.venv/bin/python bench/bench_footprint.py [--runs 5] [--variants logits-only proxy torchscript]
[--write] [--readme PATH] [--json PATH]``. ``--write`` replaces the ``bench_footprint`` section of
``bench/README.md`` (or of ``--readme``); ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402
from bench_server import free_port, start, stop, wait_http  # noqa: E402

from tests.helpers.triton import TritonServer, start_triton  # noqa: E402

VARIANTS = ("logits-only", "proxy", "torchscript")
UPSTREAM_MODEL = "identity10"
SHIPPED_MODEL = "digits-mlp"
POLL_S = 0.005
START_TIMEOUT_S = 120.0
# Targets of the issue for a logits-only worker, and what an earlier session measured before this round
# (`calibserve serve` without TorchScript models, on a fresh clone).
READY_TARGET_S = 1.0
RSS_TARGET_MIB = 120.0
BEFORE = "3.6 s to ready and 334 MB"


# ------------------------------------------------------------------------------------------- processes


def readyz(port: int) -> tuple[int, bytes]:
    """One ``GET /readyz`` on a fresh connection: (status, body); (0, b"") when nothing answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = bytearray()
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return 0, b""
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, b""
    return int(head[9:12]), body


def worker_pid(pid: int) -> int:
    """The uvicorn worker: the server process itself with one worker (else its largest child)."""
    try:
        children = [int(part) for part in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    return max(children, key=rss_mib) if children else pid


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def command_for(variant: str, port: int, store: Path, empty_models: Path, upstream: str | None) -> list[str]:
    models = REPO / "models" if variant == "torchscript" else empty_models
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "1"]
    command += ["--models-dir", str(models), "--store-dir", str(store)]
    if variant == "proxy":
        assert upstream is not None
        command += ["--upstream", upstream]
    return command


def fit_body(seed: int = 0) -> dict:
    """1,000 x 10 logits ``3 N(0, 1)``, labels drawn from softmax(logits / 2): T about 2."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1000, 10)) * 3
    z = logits / 2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) < rng.random((1000, 1))).sum(axis=1).clip(max=9)
    return {"logits": logits.astype(np.float32).tolist(), "labels": labels.tolist()}


def seed_store(variant: str, store: Path, empty_models: Path, upstream: str | None) -> None:
    """A store with an active temperature for ``m`` (and, for the proxy, ``identity10``), made by a server of
    the same kind: what a restarted deployment finds."""
    port = free_port()
    process = start(
        command_for(variant, port, store, empty_models, upstream), {"CALIBSERVE_LOG_LEVEL": "warning"}
    )
    try:
        wait_http(port, "/readyz", timeout=START_TIMEOUT_S)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            client.put("/v1/models/m", json={"num_classes": 10}).raise_for_status()
            client.post("/v1/models/m/fit", json=fit_body(1)).raise_for_status()
            if variant == "proxy":
                client.post(f"/v1/models/{UPSTREAM_MODEL}/fit", json=fit_body(2)).raise_for_status()
    finally:
        stop(process)


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Start:
    variant: str
    ready_s: float
    loaded_s: float
    rss_mib: float
    torch_loaded: bool
    first_fit_s: float | None = None
    second_fit_s: float | None = None
    rss_after_fits_mib: float | None = None
    torch_after_fits: bool | None = None


@dataclass
class Variant:
    name: str
    starts: list[Start] = field(default_factory=list)


def one_start(variant: str, index: int, root: Path, seeds: dict[str, Path], upstream: str | None) -> Start:
    store = root / f"run-{index}-{variant}" / "store"
    shutil.copytree(seeds[variant], store)
    port = free_port()
    command = command_for(variant, port, store, root / "empty-models", upstream)
    environment = {**os.environ, "CALIBSERVE_LOG_LEVEL": "warning"}
    began = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, start_new_session=True, stdout=subprocess.DEVNULL
    )
    try:
        ready_s = loaded_s = None
        while loaded_s is None:
            if process.poll() is not None:
                raise RuntimeError(f"{variant}: the server exited with {process.returncode}")
            if time.perf_counter() - began > START_TIMEOUT_S:
                raise RuntimeError(f"{variant}: not ready within {START_TIMEOUT_S:.0f} s")
            status, body = readyz(port)
            if status == 200:
                now = time.perf_counter() - began
                ready_s = ready_s if ready_s is not None else now
                if not json.loads(body).get("pending_models"):
                    loaded_s = now
                    break
            time.sleep(POLL_S)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            logits = [[2.0, -1.0, 0.5, 0.0, 1.0, -2.0, 3.0, 0.2, -0.3, 1.5]]
            answer = client.post("/v1/models/m/calibrate", json={"logits": logits})
            answer.raise_for_status()
            if variant == "proxy":
                tensor = {"name": "x", "shape": [1, 10], "datatype": "FP32", "data": logits[0]}
                body = {"inputs": [tensor], "outputs": [{"name": "probabilities"}]}
                answer = client.post(f"/v2/models/{UPSTREAM_MODEL}/infer", json=body)
                answer.raise_for_status()
                document = answer.json()
                assert [o["name"] for o in document["outputs"]] == ["probabilities"], document
                assert document["parameters"]["calibrator_version"] >= 1, document
            if variant == "torchscript":
                row = np.load(REPO / "models" / SHIPPED_MODEL / "test.npz")["inputs"][:1]
                answer = client.post(f"/v1/models/{SHIPPED_MODEL}/predict", json={"inputs": row.tolist()})
                answer.raise_for_status()
            worker = worker_pid(process.pid)
            result = Start(variant, ready_s, loaded_s, rss_mib(worker), torch_mapped(worker))
            if variant == "logits-only":
                body = fit_body(3)
                for attribute in ("first_fit_s", "second_fit_s"):
                    fit_began = time.perf_counter()
                    client.post("/v1/models/m/fit", json=body).raise_for_status()
                    setattr(result, attribute, time.perf_counter() - fit_began)
                result.rss_after_fits_mib = rss_mib(worker)
                result.torch_after_fits = torch_mapped(worker)
        return result
    finally:
        stop(process)
        shutil.rmtree(store.parent, ignore_errors=True)


def run(args: argparse.Namespace) -> tuple[dict[str, Variant], dict]:
    root = Path(tempfile.mkdtemp(prefix="calibserve-bench-footprint-"))
    (root / "empty-models").mkdir()
    triton: TritonServer | None = None
    context: dict = {}
    try:
        upstream = None
        if "proxy" in args.variants:
            triton = start_triton(models=(UPSTREAM_MODEL,))
            upstream = triton.url
            with httpx.Client(timeout=10) as client:
                context["triton_version"] = client.get(triton.url + "/v2").json().get("version", "?")
        seeds = {}
        for variant in args.variants:
            seeds[variant] = root / f"seed-{variant}"
            seed_store(variant, seeds[variant], root / "empty-models", upstream)
        results = {variant: Variant(variant) for variant in args.variants}
        for index in range(args.runs):
            shift = index % len(args.variants)
            for variant in [*args.variants[shift:], *args.variants[:shift]]:
                results[variant].starts.append(one_start(variant, index, root, seeds, upstream))
            print(f"run {index + 1}/{args.runs} done", file=sys.stderr)
        return results, context
    finally:
        if triton is not None:
            triton.close()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- report


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values)}


def figures(results: dict[str, Variant]) -> dict[str, dict]:
    out = {}
    for name, variant in results.items():
        starts = variant.starts
        entry = {
            "runs": len(starts),
            "ready_s": _stats([s.ready_s for s in starts]),
            "loaded_s": _stats([s.loaded_s for s in starts]),
            "rss_mib": _stats([s.rss_mib for s in starts]),
            "torch_loaded": sorted({s.torch_loaded for s in starts}),
        }
        if name == "logits-only":
            entry["first_fit_s"] = _stats([s.first_fit_s for s in starts])
            entry["second_fit_s"] = _stats([s.second_fit_s for s in starts])
            entry["rss_after_fits_mib"] = _stats([s.rss_after_fits_mib for s in starts])
            entry["torch_after_fits"] = sorted({s.torch_after_fits for s in starts})
        out[name] = entry
    return out


DESCRIPTIONS = {
    "logits-only": ("`serve --models-dir <empty>`", "1 calibrate"),
    "proxy": (
        "`serve --models-dir <empty> --upstream <Triton>`",
        "1 calibrate, 1 calibrated V2 infer via Triton",
    ),
    "torchscript": ("`serve --models-dir models` (digits-mlp)", "1 calibrate, 1 predict"),
}


def _yes_no(values: list[bool]) -> str:
    return " / ".join("yes" if value else "no" for value in values)


def report(shown: dict[str, dict], context: dict, args: argparse.Namespace, info: dict, wall_s: float) -> str:
    rows = []
    for name, entry in shown.items():
        command, requests = DESCRIPTIONS[name]
        loaded = (
            f"{entry['loaded_s']['median']:.2f} / {entry['loaded_s']['max']:.2f}"
            if name == "torchscript"
            else "="
        )
        rows.append(
            [
                name,
                command,
                f"{entry['ready_s']['median']:.2f} / {entry['ready_s']['max']:.2f}",
                loaded,
                requests,
                f"{entry['rss_mib']['median']:.1f} / {entry['rss_mib']['max']:.1f}",
                _yes_no(entry["torch_loaded"]),
            ]
        )
    table = markdown_table(
        [
            "deployment",
            "command",
            "Popen to first /readyz 200, s (median / max)",
            "to models loaded, s",
            "requests before RSS",
            "worker RSS MiB (median / max)",
            "torch mapped",
        ],
        rows,
    )
    lines = [
        "## Cold start and memory (`bench/bench_footprint.py`)",
        "",
        f"Command: `.venv/bin/python bench/bench_footprint.py --runs {args.runs} --variants "
        f"{' '.join(args.variants)} --write` (wall time {wall_s:.0f} s). `python -m service serve` with one "
        f"uvicorn worker on 127.0.0.1, started {args.runs} times per deployment, interleaved (the order rotates "
        "from one repetition to the next), each on a fresh copy of a store holding an active temperature "
        "(model `m`, 10 classes; for the proxy also `identity10`), made beforehand by a server of the same kind. "
        "Ready: wall time from `Popen` to the first 200 of `GET /readyz` (polled every 5 ms on a fresh raw "
        "socket), which includes the interpreter's start and every import. RSS: `VmRSS` of the worker after the "
        "listed requests; torch mapped: `libtorch` in the worker's `/proc/<pid>/maps`. The proxy's upstream is a "
        f"real Triton {context.get('triton_version', '')} (`tests/triton/serve.py`, model `identity10`) "
        "running meanwhile on the same machine.",
        "",
        table,
        "",
    ]
    logits = shown.get("logits-only")
    if logits is not None:
        fits = markdown_table(
            ["fit on a logits-only server (1,000 x 10 JSON logits)", "median", "max"],
            [
                [
                    "first `POST /v1/models/m/fit` (imports torch)",
                    f"{logits['first_fit_s']['median'] * 1e3:,.0f} ms",
                    f"{logits['first_fit_s']['max'] * 1e3:,.0f} ms",
                ],
                [
                    "second fit, same body",
                    f"{logits['second_fit_s']['median'] * 1e3:,.0f} ms",
                    f"{logits['second_fit_s']['max'] * 1e3:,.0f} ms",
                ],
                [
                    "worker RSS after the two fits",
                    f"{logits['rss_after_fits_mib']['median']:.1f} MiB",
                    f"{logits['rss_after_fits_mib']['max']:.1f} MiB",
                ],
            ],
        )
        lines += [fits, "", f"torch mapped after the fits: {_yes_no(logits['torch_after_fits'])}.", ""]
    lines += ["Targets (issue: a logits-only worker <= 1 s to ready, <= 120 MiB RSS):", ""]
    for name in ("logits-only", "proxy"):
        if name in shown:
            entry = shown[name]
            ready, rss = entry["ready_s"]["median"], entry["rss_mib"]["median"]
            lines.append(
                f"- {name}: ready {ready:.2f} s median (max {entry['ready_s']['max']:.2f}), "
                f"{'met' if ready <= READY_TARGET_S else 'missed'}; RSS {rss:.1f} MiB median "
                f"(max {entry['rss_mib']['max']:.1f}), {'met' if rss <= RSS_TARGET_MIB else 'missed'}"
            )
    lines += [
        "",
        reading(shown),
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
    ]
    return "\n".join(lines)


def reading(shown: dict[str, dict]) -> str:
    sentences = [
        f"Before this round `calibserve serve` without TorchScript models took {BEFORE} (measured by an "
        "earlier session on a fresh clone): it imported torch at start-up, which it now imports on first use."
    ]
    logits = shown.get("logits-only")
    if logits is not None:
        sentences.append(
            f"A logits-only worker now starts in {logits['ready_s']['median']:.2f} s and holds "
            f"{logits['rss_mib']['median']:.0f} MiB after serving, without torch; the first temperature fit pays "
            f"torch's import once ({logits['first_fit_s']['median'] * 1e3:,.0f} ms against "
            f"{logits['second_fit_s']['median'] * 1e3:,.0f} ms for the second), after which the worker holds "
            f"{logits['rss_after_fits_mib']['median']:.0f} MiB."
        )
    torchscript = shown.get("torchscript")
    if torchscript is not None:
        sentences.append(
            f"The TorchScript example, which needs torch to serve, holds {torchscript['rss_mib']['median']:.0f} MiB "
            f"and has its model loaded {torchscript['loaded_s']['median']:.2f} s after the start."
        )
    return " ".join(sentences)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts per deployment")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--write", action="store_true", help="write the section into the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--json", type=Path, help="write the figures (seconds, MiB) to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    results, context = run(args)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    shown = figures(results)
    wall_s = time.perf_counter() - started
    text = report(shown, context, args, info, wall_s)
    print(text)
    if args.json is not None:
        document = {"deployments": shown, **context, "wall_s": wall_s, "machine": info}
        args.json.write_text(json.dumps(document, indent=2))
    if args.write:
        replace_section(args.readme, "bench_footprint", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
