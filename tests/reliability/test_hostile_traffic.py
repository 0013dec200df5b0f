"""Hostile requests mixed with normal traffic against a real two-worker server (issue #11's requests).

While one thread calibrates as a normal client would, others send, in a loop, each request that once
killed, hung, hijacked or misled the service: size-like options far past their bounds, costly work,
parameters that made probabilities NaN, malformed tensor headers, cross-origin writes, an upload that
writes a file, and connections that send a body one byte then stall. Every hostile request must get a 4xx
(or a bounded 503/504), every normal request a correct 200, and the server must stay up with bounded memory.
Quick in ``make test`` (seconds), minutes in ``make soak``; the figures go to the terminal summary.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import numpy as np
import orjson
import torch

from tests.helpers.figures import record_figures
from tests.helpers.processes import serving_pids, status_kib, wait_for_workers
from tests.helpers.torchscript import scripted

RNG = np.random.default_rng(0)
TEN = RNG.normal(size=(400, 10)).round(4)
TEN_LABELS = RNG.integers(0, 10, size=400)
ROW = [[2.0, 0.5, -1.0, 0.0, 0.3, 0.1, -0.2, 0.7, 1.1, -2.0]]
METRICS_BODY = orjson.dumps(
    {
        "logits": RNG.normal(size=(3600, 10)).round(3).tolist(),
        "labels": RNG.integers(0, 10, size=3600).tolist(),
        "bootstrap": 10_000,
    }
)


class WritesAFile(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, "/tmp/calibserve-hostile-upload-wrote-this")
        return x


HostileRequest = Callable[[httpx.Client], httpx.Response]


def hostile_requests() -> dict[str, HostileRequest]:
    four = {"logits": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.2], [0.1, 0.3]], "labels": [0, 1, 0, 1]}
    upload = scripted(WritesAFile())
    tiny_t = {
        "method": "temperature",
        "temperature": 1e-300,
        "params": {"temperature": 1e-300},
        "num_classes": 10,
    }
    return {
        "histogram with 1e9 bins": lambda http: http.post(
            "/v1/models/two/fit", json={**four, "method": "histogram", "options": {"n_bins": 10**9}}
        ),
        "temperature bounds near 0": lambda http: http.post(
            "/v1/models/two/fit", json={**four, "options": {"bounds": [1e-300, 2e-300]}}
        ),
        "document with T = 1e-300": lambda http: http.post(
            "/v1/models/ten/calibrators?activate=false", json=tiny_t
        ),
        "bootstrap 10,000 on 3,600 rows": lambda http: http.post(
            "/v1/metrics", content=METRICS_BODY, headers={"content-type": "application/json"}
        ),
        "X-Tensor-Shape 1,³": lambda http: http.post(
            "/v1/models/ten/calibrate",
            content=b"\0" * 40,
            headers={"content-type": "application/octet-stream", "x-tensor-shape": "1,\u00b3".encode()},
        ),
        "OIP shape of 1e19": lambda http: http.post(
            "/v2/models/ten/infer",
            json={"inputs": [{"name": "logits", "shape": [0, 10**19], "datatype": "FP32", "data": []}]},
        ),
        "cross-origin text/plain write": lambda http: http.post(
            "/v1/models/ten/calibrators",
            content=orjson.dumps({"method": "temperature", "temperature": 100.0, "num_classes": 10}),
            headers={"content-type": "text/plain", "origin": "http://evil.example"},
        ),
        "upload calling torch.save": lambda http: http.put("/v1/models/writer/torchscript", content=upload),
    }


ALLOWED = {400, 403, 404, 406, 408, 413, 415, 422, 431, 503, 504}


def stalled_body(port: int) -> socket.socket:
    """A calibrate that declares 64 MiB, sends one byte, and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /v1/models/ten/calibrate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 67108864\r\n\r\n{"
    )
    return sock


def test_hostile_requests_mixed_with_normal_traffic(tmp_path, servers, soak):
    seconds = 180.0 if soak else 6.0
    server = servers(tmp_path / "store", workers=2)
    wait_for_workers(server, 2)
    with server.client() as http:
        for name, classes in (("ten", 10), ("two", 2)):
            assert http.put(f"/v1/models/{name}", json={"num_classes": classes}).status_code == 201
        fitted = http.post("/v1/models/ten/fit", json={"logits": TEN.tolist(), "labels": TEN_LABELS.tolist()})
        assert fitted.status_code == 201, fitted.text
    temperature = fitted.json()["temperature"]
    expected = np.exp(np.array(ROW[0]) / temperature)
    expected /= expected.sum()

    deadline = time.monotonic() + seconds
    normal_latencies: list[float] = []
    normal_failures: list[str] = []
    hostile_answers: Counter[tuple[str, int]] = Counter()
    unexpected: list[str] = []
    lock = threading.Lock()

    def normal() -> None:
        with server.client() as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = http.post("/v1/models/ten/calibrate", json={"logits": ROW})
                except httpx.HTTPError as exc:
                    normal_failures.append(repr(exc))
                    continue
                elapsed = time.perf_counter() - started
                body = response.json() if response.status_code == 200 else None
                if body is None or not np.allclose(body["probabilities"][0], expected, rtol=1e-9):
                    normal_failures.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    normal_latencies.append(elapsed)

    def hostile(name: str, send: HostileRequest) -> None:
        with httpx.Client(base_url=server.url, timeout=60.0) as http:
            while time.monotonic() < deadline:
                try:
                    status = send(http).status_code
                except httpx.HTTPError as exc:  # a refused request may be cut off; the server must live on
                    status = -1
                    detail = repr(exc)
                else:
                    detail = ""
                with lock:
                    hostile_answers[(name, status)] += 1
                    if status not in ALLOWED and status != -1:
                        unexpected.append(f"{name}: {status} {detail}")

    stalled = [stalled_body(server.port) for _ in range(4)]
    threads = [threading.Thread(target=normal)]
    threads += [threading.Thread(target=hostile, args=item) for item in hostile_requests().items()]
    peak_kib = 0
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for pid in serving_pids(server):
            with contextlib.suppress(OSError):
                peak_kib = max(peak_kib, status_kib(pid, "VmRSS"))
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    for sock in stalled:
        sock.close()

    assert server.process.poll() is None, "the server died"
    assert not unexpected, unexpected[:10]
    assert not normal_failures, normal_failures[:10]
    assert normal_latencies, "no normal request was answered"
    for name in hostile_requests():
        assert sum(count for (which, _), count in hostile_answers.items() if which == name) > 0, name
    assert not os.path.exists("/tmp/calibserve-hostile-upload-wrote-this"), "an upload ran torch.save"
    latencies_ms = sorted(value * 1000 for value in normal_latencies)
    statuses: Counter[int] = Counter()
    for (_, status), count in hostile_answers.items():
        statuses[status] += count
    record_figures(
        "hostile_traffic",
        seconds=seconds,
        normal_requests=len(latencies_ms),
        normal_p50_ms=round(statistics.median(latencies_ms), 2),
        normal_p99_ms=round(latencies_ms[int(0.99 * (len(latencies_ms) - 1))], 2),
        hostile_requests=sum(hostile_answers.values()),
        hostile_statuses={str(status): count for status, count in sorted(statuses.items())},
        peak_worker_rss_mib=round(peak_kib / 1024, 1),
    )
    assert peak_kib < 3 * 1024 * 1024, f"a worker reached {peak_kib / 1024:.0f} MiB"
