"""Load on a real two-worker server: 64 clients mixing calibrate, predict, fit and activate; back-pressure;
and (``make soak``) 200k calibrate requests with the workers' memory and file descriptors watched.

The concurrency test checks every answer afterwards, against what the clients were told: a calibrate or
predict answer must equal ``softmax(z / T)`` for the temperature of the version it names, and that version
must have been active at some moment of the request: it was activated by a request that started before this
one ended, and no activation of another version both started after that activation was acknowledged and was
itself acknowledged before this request started. A torn read (a version number with another version's
temperature, or a stale cache serving an old version long after a newer one was acknowledged) fails it.

Found here (fixed in service/api/limits.py): nothing bounded the request bodies in flight in a worker, and
JSON costs up to ~40x its size in memory once parsed, so a few dozen concurrent 64 MiB bodies could take a
worker down; now a worker admits at most CALIBSERVE_MAX_BODY_BYTES of bodies at a time.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson
import pytest

from tests.helpers.figures import record_figures
from tests.helpers.numerics import softmax_t
from tests.helpers.processes import open_fds, serving_pids, status_kib, wait_for_workers
from tests.helpers.rawhttp import connect, read_response, request_head

MODEL = "digits-mlp"
CLIENTS = 64


@dataclass
class Log:
    calls: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **call) -> None:
        with self.lock:
            self.calls.append(call)


def client(url: str, seed: int, data: dict, log: Log, deadline: float, versions: list[int]) -> None:
    rng = random.Random(seed)
    fit_logits, fit_labels = data["fit_logits"], data["fit_labels"]
    with httpx.Client(base_url=url, timeout=60.0) as http:
        while time.monotonic() < deadline:
            operation = rng.choices(["calibrate", "predict", "fit", "activate"], weights=[55, 25, 10, 10])[0]
            rows = rng.sample(range(len(data["logits"])), rng.randint(1, 8))
            if operation == "calibrate":
                request = ("POST", f"/v1/models/{MODEL}/calibrate", {"logits": data["logits"][rows].tolist()})
            elif operation == "predict":
                body = {"inputs": data["inputs"][rows].tolist(), "return_logits": True}
                request = ("POST", f"/v1/models/{MODEL}/predict", body)
            elif operation == "fit":
                subset = np.sort(rng.sample(range(len(fit_labels)), rng.randint(30, len(fit_labels))))
                body = {
                    "logits": fit_logits[subset].tolist(),
                    "labels": fit_labels[subset].tolist(),
                    "activate": rng.random() < 0.7,
                }
                request = ("POST", f"/v1/models/{MODEL}/fit", body)
            else:
                request = ("POST", f"/v1/models/{MODEL}/calibrators/{rng.choice(versions)}/activate", None)
            method, path, body = request
            start = time.monotonic()
            try:
                response = http.request(method, path, json=body)
            except httpx.HTTPError as exc:  # a reset or timeout is a failure too, not a quieter thread
                log.add(operation=operation, start=start, end=time.monotonic(), status=repr(exc))
                continue
            end = time.monotonic()
            answer = response.json() if response.headers.get("content-type", "").endswith("json") else None
            log.add(
                operation=operation,
                start=start,
                end=end,
                status=response.status_code,
                rows=rows,
                body=body,
                answer=answer,
            )
            if operation == "fit" and response.status_code == 201:
                versions.append(answer["version"])  # list.append is atomic: other clients may activate it


def legitimate(version: int, start: float, end: float, activations: list[tuple[float, float, int]]) -> bool:
    for a_start, a_end, a_version in activations:
        if a_version != version or a_start >= end:
            continue
        superseded = any(
            b_version != version and b_start > a_end and b_end < start
            for b_start, b_end, b_version in activations
        )
        if not superseded:
            return True
    return False


def percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 1) if values else float("nan")


@pytest.mark.timeout(600)
def test_64_clients_mixing_operations_see_no_5xx_and_no_torn_state(
    tmp_path, servers, digits_logits, fit_body, soak
):
    seconds = 30 if soak else 6
    server = servers(tmp_path / "store", workers=2)
    with server.client() as http:
        first = http.post(
            f"/v1/models/{MODEL}/fit",
            json=fit_body,
        )
        assert first.status_code == 201, first.text
    log = Log()
    log.add(
        operation="fit", start=0.0, end=0.0, status=201, rows=[], body={"activate": True}, answer=first.json()
    )
    versions = [first.json()["version"]]
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(server.url, seed, digits_logits, log, deadline, versions))
        for seed in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)

    calls = log.calls
    statuses = defaultdict(int)
    for call in calls:
        statuses[call["status"]] += 1
    # no 5xx, no 4xx either, and no connection failure
    assert all(isinstance(status, int) and 200 <= status < 300 for status in statuses), dict(statuses)

    temperatures = {
        call["answer"]["version"]: call["answer"]["temperature"]
        for call in calls
        if call["operation"] == "fit"
    }
    activations = [
        (call["start"], call["end"], call["answer"]["version"])
        for call in calls
        if (call["operation"] == "fit" and call["body"]["activate"]) or call["operation"] == "activate"
    ]
    checked = 0
    for call in calls:
        if call["operation"] not in ("calibrate", "predict"):
            continue
        version = call["answer"]["calibrator_version"]
        assert version in temperatures, f"answer names version {version}, which no fit returned"
        assert legitimate(version, call["start"], call["end"], activations), (
            f"{call['operation']} answered with version {version}, which was not active during the request"
        )
        logits = (
            # the model's float32 logits, printed shortest-round-trip: read back as float32 they are exact
            np.asarray(call["answer"]["logits"], dtype=np.float32).astype(np.float64)
            if call["operation"] == "predict"
            else digits_logits["logits"][call["rows"]]
        )
        np.testing.assert_allclose(
            call["answer"]["probabilities"],
            softmax_t(logits, temperatures[version]),
            rtol=1e-9,
            atol=1e-15,
            err_msg=call["operation"],
        )
        checked += 1

    latency = defaultdict(list)
    for call in calls[1:]:
        latency[call["operation"]].append(call["end"] - call["start"])
    figures = {
        "clients": CLIENTS,
        "seconds": seconds,
        "requests": len(calls) - 1,
        "answers_checked": checked,
        "versions": len(temperatures),
        "p99_ms_all": percentile_ms([v for values in latency.values() for v in values], 99),
    }
    for operation, values in sorted(latency.items()):
        figures[f"p50_ms_{operation}"] = percentile_ms(values, 50)
        figures[f"p99_ms_{operation}"] = percentile_ms(values, 99)
    record_figures("load" + ("-soak" if soak else ""), **figures)
    assert checked > CLIENTS and len(temperatures) > 2  # the mix did happen


# ------------------------------------------------------------------------------------------- back-pressure


def test_beyond_the_concurrency_limit_the_answer_is_503_at_once(tmp_path, servers):
    limit, extra = 2, 6
    server = servers(tmp_path / "store", workers=1, env={"CALIBSERVE_MAX_CONCURRENCY": str(limit)})
    with server.client() as http:
        assert http.put("/v1/models/m", json={"num_classes": 2}).status_code == 201
    body = orjson.dumps({"logits": [[0.5, -0.5]] * 50})
    head = request_head(
        "POST",
        "/v1/models/m/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    held = []
    try:
        # `limit` requests whose bodies are half sent: the server holds them in flight until we finish them
        for _ in range(limit):
            sock = connect(server.port)
            sock.sendall(head + body[:10])
            held.append(sock)
        # every further request is refused while those are held, so it cannot have waited for a slot
        refused = []
        deadline = time.monotonic() + 60
        while len(refused) < extra:
            assert time.monotonic() < deadline, "no 503 while the limit was reached"
            with connect(server.port) as sock:
                sock.sendall(head + body)
                response = read_response(sock)
            if response.status == 503:
                refused.append(response)
            else:
                assert response.status == 200 and not refused  # only before both held requests arrived
        for response in refused:
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.headers["retry-after"] == "1"
            assert "CALIBSERVE_MAX_CONCURRENCY" in response.json()["detail"]
        for sock in held:
            sock.sendall(body[10:])
            assert read_response(sock).status == 200
    finally:
        for sock in held:
            sock.close()
    with server.client() as http:
        assert http.post("/v1/models/m/calibrate", json={"logits": [[1.0, 0.0]]}).status_code == 200


def test_request_bodies_in_flight_are_bounded_by_the_body_limit(tmp_path, servers):
    """Two bodies of 60 % of CALIBSERVE_MAX_BODY_BYTES cannot be in flight in one worker at once.

    Parsing JSON costs up to ~40x the body in memory (test_hostile.py), so a worker holds at most one
    maximal body's worth of bodies at a time; requests without a body, and small ones, still pass. Bytes
    count as they arrive (a declared length reserves nothing: test_slow_clients.py), so the held request
    sends all of its body but the last 100 bytes.
    """
    limit = 1 << 20
    server = servers(tmp_path / "store", workers=1, env={"CALIBSERVE_MAX_BODY_BYTES": str(limit)})
    with server.client() as http:
        assert http.put("/v1/models/m", json={"num_classes": 2}).status_code == 201
    rows = int(0.6 * limit) // len(b"[0.5,-0.5],")
    big = orjson.dumps({"logits": [[0.5, -0.5]] * rows})
    assert 0.5 * limit < len(big) < limit
    head = request_head(
        "POST",
        "/v1/models/m/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(len(big))},
    )
    with connect(server.port) as held:
        held.sendall(head + big[:-100])  # in flight until the rest is sent
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "a second large body was never refused"
            with connect(server.port) as sock:
                sock.sendall(head + big)
                response = read_response(sock)
            if response.status == 503:
                break
            assert response.status == 200  # only until the held request has reached the worker
        assert response.headers["retry-after"] == "1"
        assert "CALIBSERVE_MAX_BODY_BYTES" in response.json()["detail"]
        with server.client() as http:  # small and bodiless requests are not held back
            assert http.get("/healthz").status_code == 200
            assert http.post("/v1/models/m/calibrate", json={"logits": [[1.0, 0.0]]}).status_code == 200
        held.sendall(big[-100:])
        answer = read_response(held)
    assert answer.status == 200 and len(answer.json()["probabilities"]) == rows
    with connect(server.port) as sock:  # the budget is released: the same body passes now
        sock.sendall(head + big)
        assert read_response(sock).status == 200


# -------------------------------------------------------------------------------------------------- soak


def calibrate_loop(
    port: int, requests: int, payload: bytes, latencies: list[float], errors: list[str]
) -> None:
    """Keep-alive raw HTTP: the client must not be the bottleneck of a 200k-request soak."""
    head = request_head(
        "POST",
        f"/v1/models/{MODEL}/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(len(payload))},
    )
    message = head + payload
    sock = connect(port)
    try:
        for _ in range(requests):
            start = time.perf_counter()
            sock.sendall(message)
            response = read_response(sock)
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                errors.append(f"{response.status} {response.body[:200]!r}")
    finally:
        sock.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_200k_calibrations_memory_and_fds_stay_flat(tmp_path, servers, digits_logits, fit_body):
    total, connections, warm_up = 200_000, 8, 0.1
    server = servers(tmp_path / "store", workers=2)
    with server.client() as http:
        fitted = http.post(
            f"/v1/models/{MODEL}/fit",
            json=fit_body,
        )
        assert fitted.status_code == 201
    payload = orjson.dumps({"logits": digits_logits["logits"][:4].tolist()})
    workers = wait_for_workers(server, 2)  # the second may still be starting after the first answered

    def run(requests: int) -> tuple[list[float], list[str]]:
        latencies: list[float] = []
        errors: list[str] = []
        per_connection = requests // connections
        threads = [
            threading.Thread(
                target=calibrate_loop, args=(server.port, per_connection, payload, latencies, errors)
            )
            for _ in range(connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return latencies, errors

    _, errors = run(int(total * warm_up))
    rss_before = {pid: status_kib(pid, "VmRSS") for pid in workers}
    fds_before = {pid: open_fds(pid) for pid in workers}
    started = time.monotonic()
    latencies, more_errors = run(total - int(total * warm_up))
    elapsed = time.monotonic() - started
    rss_after = {pid: status_kib(pid, "VmRSS") for pid in workers}
    fds_after = {pid: open_fds(pid) for pid in workers}
    assert not errors + more_errors, (errors + more_errors)[:3]
    growth = {pid: (rss_after[pid] - rss_before[pid]) / rss_before[pid] for pid in workers}
    record_figures(
        "soak",
        requests=total,
        requests_per_s=round(len(latencies) / elapsed),
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
        rss_mib_after_warm_up=[round(rss_before[pid] / 1024, 1) for pid in workers],
        rss_growth_percent=[round(100 * growth[pid], 3) for pid in workers],
        rss_kib_after_warm_up_and_at_end=[f"{rss_before[pid]}->{rss_after[pid]}" for pid in workers],
        fds=[f"{fds_before[pid]}->{fds_after[pid]}" for pid in workers],
    )
    assert serving_pids(server) == workers  # no worker died and was replaced
    for pid in workers:
        assert growth[pid] < 0.10, f"worker {pid} grew by {100 * growth[pid]:.1f} % after warm-up"
        assert fds_after[pid] <= fds_before[pid] + 2, (
            f"worker {pid}: fds {fds_before[pid]} -> {fds_after[pid]}"
        )
