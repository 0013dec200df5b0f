"""The S3 calibrator store against the directory store, and two replicas on one bucket.

Real ``calibserve serve`` processes on 127.0.0.1 (``tests/helpers/servers.py``), one worker each; the S3 store
on moto's real S3 server in this process (``tests/helpers/s3.py``: ThreadedMotoServer on a free port, same
host, so the figures are the store's own work plus a loopback round trip, not a network's). Logits-only
models of 10 classes; fits on 200 rows of float32 logits ``3 N(0, 1)``, labels drawn from ``softmax(z / 2)``.

1. Fit and activate: after one untimed warm-up fit, ``--fits`` fits (each activates its version) and as many activations of an earlier
   version, on a server with the directory store and on one with the S3 store, interleaved; p50 and p99.
2. Calibrate (1 x 10 JSON, one keep-alive connection): ``--requests`` requests on each server, interleaved
   in rounds; p50 and p99.
3. Propagation: two replicas A and B on one bucket (``CALIBSERVE_STORE_REFRESH_S`` = ``--refresh``). For each of
   ``--propagation-fits`` fits answered by A (each after a random pause of up to ``--refresh``), B is asked to calibrate (a new connection's worth of work is not
   included: one keep-alive connection) until its ``calibrator_version`` is the new version; the delay is
   from A's answer to B's first answer with it. p50, p99, max.
4. Store down: moto is stopped under a serving replica; for ``--down-seconds`` calibrate requests run back to
   back (one connection) and one fit is tried: how many calibrations were served (200) and what the fit got.

Bounded: every loop has a count or a deadline. Usage: ``.venv/bin/python bench/bench_store.py [--fits 50]
[--requests 2000] [--propagation-fits 100] [--refresh 1.0] [--down-seconds 5] [--write] [--readme PATH]
[--json PATH]``. ``--write`` replaces the ``bench_store`` section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from tests.helpers.s3 import S3Endpoint, free_port  # noqa: E402
from tests.helpers.servers import Server  # noqa: E402

CLASSES = 10
FIT_ROWS = 200
PROPAGATION_DEADLINE_S = 30.0
ROW = {"logits": [[2.0, 0.5, -1.0, 0.3, 0.0, 0.1, -0.2, 1.1, 0.4, -0.7]]}


def fit_body(rng: np.random.Generator) -> dict[str, Any]:
    logits = (3 * rng.standard_normal((FIT_ROWS, CLASSES))).astype(np.float32)
    scaled = logits.astype(np.float64) / 2.0
    probabilities = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    cumulative = np.cumsum(probabilities / probabilities.sum(axis=1, keepdims=True), axis=1)
    draws = rng.random((FIT_ROWS, 1))
    labels = np.minimum((cumulative < draws).sum(axis=1), CLASSES - 1).tolist()
    return {"logits": logits.tolist(), "labels": labels}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def timed(call: Any) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = call()
    return time.perf_counter() - started, response


def start_server(root: Path, name: str, env: dict[str, str]) -> Server:
    models = root / "no-models"
    models.mkdir(exist_ok=True)
    return Server(root / name, models=models, env=env)


def measure_writes_and_reads(args: argparse.Namespace, servers: dict[str, Server]) -> dict[str, Any]:
    """Sections 1 and 2: the same work on each server, interleaved so outside load hits both alike."""
    rng = np.random.default_rng(0)
    bodies = [fit_body(rng) for _ in range(8)]
    figures: dict[str, dict[str, list[float]]] = {
        name: {"fit": [], "activate": [], "calibrate": []} for name in servers
    }
    clients = {name: server.client() for name, server in servers.items()}
    try:
        for client in clients.values():
            assert client.put("/v1/models/m", json={"num_classes": CLASSES}).status_code == 201
            # warm-up, not timed: the first fit of a worker imports the fitting code
            assert client.post("/v1/models/m/fit", json=bodies[0]).status_code == 201
        for index in range(args.fits):
            for name, client in clients.items():
                seconds, answer = timed(
                    lambda c=client, body=bodies[index % 8]: c.post("/v1/models/m/fit", json=body)
                )
                assert answer.status_code == 201, answer.text
                figures[name]["fit"].append(seconds)
                earlier = max(1, answer.json()["version"] - 1)
                seconds, answer = timed(
                    lambda c=client, v=earlier: c.post(f"/v1/models/m/calibrators/{v}/activate")
                )
                assert answer.status_code == 200, answer.text
                figures[name]["activate"].append(seconds)
        rounds = 20
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(args.requests // rounds):
                    seconds, answer = timed(lambda c=client: c.post("/v1/models/m/calibrate", json=ROW))
                    assert answer.status_code == 200, answer.text
                    figures[name]["calibrate"].append(seconds)
    finally:
        for client in clients.values():
            client.close()
    return {
        name: {
            kind: {"n": len(values), "p50_s": percentile(values, 50), "p99_s": percentile(values, 99)}
            for kind, values in kinds.items()
        }
        for name, kinds in figures.items()
    }


def measure_propagation(args: argparse.Namespace, first: Server, second: Server) -> dict[str, Any]:
    """Section 3: from A's answer to a fit to B's first calibrate answer with the new version."""
    rng = np.random.default_rng(1)
    bodies = [fit_body(rng) for _ in range(8)]
    delays: list[float] = []
    polls: list[int] = []
    with first.client() as a, second.client() as b:
        assert a.put("/v1/models/p", json={"num_classes": CLASSES}).status_code == 201
        for index in range(args.propagation_fits):
            # at a random moment of B's refresh cycle: right after B saw the last fit, the next would always
            # find B at the start of its cycle
            time.sleep(float(rng.uniform(0.0, args.refresh)))
            answer = a.post("/v1/models/p/fit", json=bodies[index % 8])
            assert answer.status_code == 201, answer.text
            answered, version = time.perf_counter(), answer.json()["version"]
            deadline = answered + PROPAGATION_DEADLINE_S
            count = 0
            while time.perf_counter() < deadline:
                count += 1
                if b.post("/v1/models/p/calibrate", json=ROW).json()["calibrator_version"] == version:
                    delays.append(time.perf_counter() - answered)
                    polls.append(count)
                    break
            else:
                raise RuntimeError(
                    f"replica B did not serve version {version} within {PROPAGATION_DEADLINE_S} s"
                )
    return {
        "fits": len(delays),
        "refresh_s": args.refresh,
        "p50_s": percentile(delays, 50),
        "p99_s": percentile(delays, 99),
        "max_s": max(delays),
        "mean_polls": statistics.mean(polls),
    }


def measure_store_down(args: argparse.Namespace, server: Server, stop_store: Any) -> dict[str, Any]:
    """Section 4: stop the S3 server under a serving replica; count what is still served."""
    rng = np.random.default_rng(2)
    with server.client() as client:
        assert client.put("/v1/models/d", json={"num_classes": CLASSES}).status_code == 201
        assert client.post("/v1/models/d/fit", json=fit_body(rng)).status_code == 201
        stop_store()
        served, failed, versions = 0, 0, set()
        deadline = time.perf_counter() + args.down_seconds
        while time.perf_counter() < deadline:
            answer = client.post("/v1/models/d/calibrate", json=ROW)
            if answer.status_code == 200:
                served += 1
                versions.add(answer.json()["calibrator_version"])
            else:
                failed += 1
        seconds, fit = timed(lambda: client.post("/v1/models/d/fit", json=fit_body(rng)))
        ready = client.get("/readyz")
    return {
        "seconds": args.down_seconds,
        "calibrations_served": served,
        "calibrations_failed": failed,
        "versions_served": sorted(versions),
        "fit_status": fit.status_code,
        "fit_seconds": seconds,
        "fit_detail": fit.json().get("detail", "")[:160],
        "readyz_status": ready.status_code,
        "readyz_store": ready.json().get("store"),
    }


def report(results: dict[str, Any], args: argparse.Namespace, info: dict[str, str], wall_s: float) -> str:
    command = (
        f".venv/bin/python bench/bench_store.py --fits {args.fits} --requests {args.requests} "
        f"--propagation-fits {args.propagation_fits} --refresh {args.refresh:g} "
        f"--down-seconds {args.down_seconds:g} --write"
    )
    lines = [
        "## S3 store (`bench/bench_store.py`)",
        "",
        f"Command: `{command}` (wall time {wall_s:.0f} s). Real `calibserve serve` processes (one worker each) "
        "on 127.0.0.1; the S3 store on moto's S3 server in the bench process (same host: the store's own work "
        "plus a loopback round trip, no network). Logits-only model of 10 classes, fits on 200 rows.",
        "",
        "### 1-2. Fit, activate and calibrate latency",
        "",
    ]
    rows = []
    for kind, label in (
        ("fit", "fit + activate (POST /fit)"),
        ("activate", "activate"),
        ("calibrate", "calibrate 1 x 10"),
    ):
        directory, s3 = results["latency"]["directory"][kind], results["latency"]["s3"][kind]
        rows.append(
            [
                label,
                directory["n"],
                ms(directory["p50_s"]),
                ms(directory["p99_s"]),
                ms(s3["p50_s"]),
                ms(s3["p99_s"]),
                f"{s3['p50_s'] / directory['p50_s']:.2f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "operation",
                "n each",
                "directory p50",
                "directory p99",
                "S3 p50",
                "S3 p99",
                "S3 / directory (p50)",
            ],
            rows,
        )
    )
    propagation = results["propagation"]
    down = results["down"]
    lines += [
        "",
        "Calibrate reads the cached view on both (the S3 store's refresher thread keeps it within the refresh "
        "bound), so its latency does not depend on the store; writes pay the S3 round trips: a fit that "
        "activates lists the model's versions, claims a number (conditional create), writes the document "
        "(conditional create), reads and swaps the pointer (compare-and-swap).",
        "",
        f"### 3. Propagation between two replicas ({propagation['fits']} fits, refresh {propagation['refresh_s']:g} s)",
        "",
        markdown_table(
            ["p50", "p99", "max", "bound (refresh + a round trip)", "calibrate polls per fit (mean)"],
            [
                [
                    ms(propagation["p50_s"]),
                    ms(propagation["p99_s"]),
                    ms(propagation["max_s"]),
                    f"{propagation['refresh_s']:g} s + RTT",
                    f"{propagation['mean_polls']:.0f}",
                ]
            ],
        ),
        "",
        "From replica A's answer to the fit to replica B's first calibrate answer naming the new version. B "
        "refreshes the models it serves every refresh / 2 in the background (ETag-conditional GETs), so the "
        "delay spreads over about [0, refresh / 2] plus the refresh's own requests.",
        "",
        f"### 4. Requests served while the store is down ({down['seconds']:g} s, moto stopped)",
        "",
        markdown_table(
            ["calibrations served", "failed", "versions served", "a fit", "/readyz"],
            [
                [
                    down["calibrations_served"],
                    down["calibrations_failed"],
                    ", ".join(map(str, down["versions_served"])),
                    f"{down['fit_status']} after {down['fit_seconds']:.2f} s",
                    f"{down['readyz_status']}, writable {down['readyz_store'].get('writable')}",
                ]
            ],
        ),
        "",
        f'The fit\'s detail: "{down["fit_detail"]}".',
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=50, help="fits (and activations) per store (section 1)")
    parser.add_argument("--requests", type=int, default=2000, help="calibrate requests per store (section 2)")
    parser.add_argument("--propagation-fits", type=int, default=100, help="section 3")
    parser.add_argument(
        "--refresh", type=float, default=1.0, help="CALIBSERVE_STORE_REFRESH_S of the replicas"
    )
    parser.add_argument("--down-seconds", type=float, default=5.0, help="section 4")
    parser.add_argument("--write", action="store_true", help="write the section into the README")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="calibserve-bench-store-"))
    results: dict[str, Any] = {}
    servers: list[Server] = []
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    running = True
    try:
        endpoint = S3Endpoint(f"http://127.0.0.1:{port}")
        bucket = endpoint.new_bucket()
        s3 = {
            **endpoint.environment,
            "CALIBSERVE_STORE_URL": f"s3://{bucket}/bench",
            "CALIBSERVE_STORE_REFRESH_S": str(args.refresh),
        }
        directory = start_server(root, "directory", {})
        replica_a = start_server(root, "replica-a", s3)
        replica_b = start_server(root, "replica-b", s3)
        servers += [directory, replica_a, replica_b]
        results["latency"] = measure_writes_and_reads(args, {"directory": directory, "s3": replica_a})
        results["propagation"] = measure_propagation(args, replica_a, replica_b)
        moto_stop = moto.stop
        results["down"] = measure_store_down(args, replica_b, moto_stop)
        running = False
    finally:
        for server in servers:
            server.stop()
        if running:
            moto.stop()
        shutil.rmtree(root, ignore_errors=True)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    wall_s = time.perf_counter() - started
    if args.json is not None:
        args.json.write_text(json.dumps({**results, "wall_s": wall_s, "machine": info}, indent=2))
    text = report(results, args, info, wall_s)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_store", text, intro="# Benchmarks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
