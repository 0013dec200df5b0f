"""The proxy's upstream transport, :class:`service.http_pool.HttpPool`, against aiohttp's client (which the
proxy used before), on the same calls to a real Triton.

Starts a real Triton Inference Server (``tests/triton/serve.py`` through ``tests/helpers/triton.py``) serving
``identity10`` and ``identity1000`` and, in one process and one uvloop event loop, sends the infer call that
the proxy sends for a lone request: binary input ``x`` (1 x 10 or 64 x 1000 FP32), binary output ``logits``,
one keep-alive connection, one call at a time. Each round times ``--calls`` calls of each client in the order
pool, aiohttp, aiohttp, pool, ... (ABBA, ``--rounds`` rounds); every answer's logits are checked against x
once per round. Figures: the process's CPU time per call (``time.process_time``: this process is the
client, the server runs in its own) and the p50 round trip, medians over the rounds, and aiohttp / pool.

aiohttp is configured as the proxy had it: ``ClientSession(base_url, timeout=ClientTimeout(total,
sock_connect), connector=TCPConnector(limit), skip_auto_headers=("accept-encoding",))``, each call inside
``asyncio.timeout`` with ``await response.read()``. aiohttp comes with ``tritonclient[http]`` (dev extra).

Usage: ``.venv/bin/python bench/bench_upstream_client.py [--calls 400] [--rounds 4] [--write]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _timing import machine_info, markdown_table, replace_section  # noqa: E402

from service import inference_protocol as wire  # noqa: E402
from service.http_pool import HttpPool  # noqa: E402
from tests.helpers.triton import start_triton  # noqa: E402

MODELS = {10: "identity10", 1000: "identity1000"}
SIZES = ((1, 10), (64, 1000))
TIMEOUT = 30.0


def request_body(x: np.ndarray) -> tuple[list, dict[str, str]]:
    entry, chunk = wire.binary_entry("x", x)
    document = {"inputs": [entry], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    parts, header_length = wire.encode_parts(document, [chunk])
    return parts, {"content-type": "application/octet-stream", wire.HEADER_LENGTH: str(header_length)}


def logits_of(content, header_length: str, shape: tuple[int, int]) -> np.ndarray:
    document, binary = wire.split_body(content, header_length)
    return wire.tensor_array(document["outputs"][0], binary, "logits").reshape(shape)


async def measure(url: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in SIZES:
        rows.append(await measure_size(url, size, args))
        print(f"{size[0]} x {size[1]} done", file=sys.stderr)
    return rows


async def measure_size(url: str, size: tuple[int, int], args: argparse.Namespace) -> dict:
    x = np.random.default_rng(0).normal(size=size).astype(np.float32)
    parts, headers = request_body(x)
    body = b"".join(parts)
    path = f"/v2/models/{MODELS[size[1]]}/infer"
    pool = HttpPool(url, connect_timeout=2.0, max_connections=10)
    session = aiohttp.ClientSession(
        base_url=url,
        timeout=aiohttp.ClientTimeout(total=TIMEOUT, sock_connect=2.0),
        connector=aiohttp.TCPConnector(limit=10, limit_per_host=10),
        skip_auto_headers=("accept-encoding",),
    )

    async def with_pool():
        reply = await pool.request("POST", path, content=parts, headers=headers, timeout=TIMEOUT)
        return reply.content, reply.headers[wire.HEADER_LENGTH.lower()]

    async def with_aiohttp():
        async with asyncio.timeout(TIMEOUT):
            async with session.request("POST", path, data=body, headers=headers) as response:
                return await response.read(), response.headers[wire.HEADER_LENGTH]

    clients = {"pool": with_pool, "aiohttp": with_aiohttp}
    figures: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "p50": []} for name in clients}
    for round_number in range(args.rounds):
        order = ["pool", "aiohttp"] if round_number % 2 == 0 else ["aiohttp", "pool"]
        for name in order:
            call = clients[name]
            content, header_length = await call()
            np.testing.assert_array_equal(logits_of(content, header_length, size), x)
            for _ in range(20):
                await call()
            latencies = []
            began = time.process_time()
            for _ in range(args.calls):
                start = time.perf_counter()
                await call()
                latencies.append(time.perf_counter() - start)
            figures[name]["cpu"].append((time.process_time() - began) / args.calls)
            figures[name]["p50"].append(statistics.median(latencies))
    await session.close()
    await pool.aclose()
    cpu = {name: statistics.median(values["cpu"]) for name, values in figures.items()}
    p50 = {name: statistics.median(values["p50"]) for name, values in figures.items()}
    return {"size": f"{size[0]} x {size[1]}", "cpu": cpu, "p50": p50}


def report(rows: list[dict], args: argparse.Namespace, info: dict[str, str], wall: float) -> str:
    table = markdown_table(
        [
            "logits",
            "CPU ms per call, pool",
            "CPU ms per call, aiohttp",
            "aiohttp / pool (CPU)",
            "p50 ms, pool",
            "p50 ms, aiohttp",
        ],
        [
            [
                row["size"],
                f"{1e3 * row['cpu']['pool']:.3f}",
                f"{1e3 * row['cpu']['aiohttp']:.3f}",
                f"{row['cpu']['aiohttp'] / row['cpu']['pool']:.2f}",
                f"{1e3 * row['p50']['pool']:.2f}",
                f"{1e3 * row['p50']['aiohttp']:.2f}",
            ]
            for row in rows
        ],
    )
    machine = ", ".join(f"{key} {value}" for key, value in info.items())
    return (
        "## The proxy's upstream transport (`bench/bench_upstream_client.py`)\n\n"
        f"Command: `.venv/bin/python bench/bench_upstream_client.py --calls {args.calls} --rounds "
        f"{args.rounds} --write` (wall time {wall:.0f} s). The infer call the proxy sends for a lone request "
        "(binary `x` in, binary `logits` out) to a real Triton (PyTriton, CPU), one call at a time over one "
        "keep-alive connection, from one uvloop event loop: calibserve's `HttpPool` (asyncio and httptools; "
        "a body of stated length received in place) against aiohttp's client as the proxy had it. CPU is this "
        "process's (the client's) per call; medians over the rounds (ABBA). Triton runs beside it on the "
        "same 2 cores.\n\n"
        f"{table}\n\nMachine: {machine}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per client and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write the section into bench/README.md")
    parser.add_argument("--readme", type=Path, default=REPO / "bench" / "README.md")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    triton = start_triton(models=tuple(MODELS.values()))
    try:
        rows = uvloop.run(measure(triton.url, args))
    finally:
        triton.close()
    text = report(rows, args, machine_info({"aiohttp": aiohttp.__version__}), time.perf_counter() - began)
    print(text)
    if args.write:
        replace_section(args.readme, "bench_upstream_client", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
