"""Faults, on a real server process: a store that cannot be written, models that fail, SIGTERM mid-request.

The store faults are real kernel refusals, not mocks:

- ``read-only``: the store is a tmpfs that is remounted read-only under the running server (EROFS);
- ``disk-full``: the store is a small tmpfs filled to the last byte (ENOSPC);
- ``file-size-limit``: ``RLIMIT_FSIZE`` of the server process lowered to 0 with prlimit(2) (EFBIG; needs no
  privileges, so it runs everywhere; the tmpfs variants skip where mount(8) is not permitted).

Found here (fixed in service/api/routers/health.py): ``/readyz`` answered 503 while the store could not be
written, so every replica would have left its load balancer although calibrate and predict kept working; it
also fsynced its probe file on the event loop. Found here, fixed in service/api/server.py (2b0256e): a
multi-worker server left its ``PROMETHEUS_MULTIPROC_DIR`` behind after SIGTERM.
"""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.data import SHIPPED_MODELS
from tests.helpers.numerics import softmax_t
from tests.helpers.problems import assert_problem
from tests.helpers.processes import serving_pids
from tests.helpers.rawhttp import connect, read_response, request_head
from tests.helpers.stores import remount, store_entries, temp_files, tmpfs
from tests.helpers.torchscript import Raises, ReturnsNaN, WrongShape, scripted
from tests.helpers.waiting import wait_until

DIGITS_MODEL = (SHIPPED_MODELS / "digits-mlp" / "model.pt").read_bytes()


# ------------------------------------------------------------------------------------ store not writable


def fill_up(directory: Path) -> None:
    """Write one file until the file system says ENOSPC, down to the last byte it can hold."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("read-only", "Read-only file system"),
        ("disk-full", "No space left on device"),
        ("file-size-limit", "File too large"),
    ],
)
def test_store_not_writable_answers_503_and_keeps_serving(
    tmp_path, servers, digits_logits, fit_body, fault, reason
):
    mount_point = tmp_path / "volume"
    if fault == "file-size-limit":
        mount_point.mkdir()
        volume = mount_point
        context = None
    else:
        context = tmpfs(mount_point, size="8m")
        volume = context.__enter__()
    try:
        store = volume / "store"
        server = servers(store, workers=1)
        http = server.client()
        assert http.put("/v1/models/m", json={"num_classes": 10}).status_code == 201
        first = http.post("/v1/models/m/fit", json=fit_body)
        assert first.status_code == 201
        temperature = first.json()["temperature"]
        uploaded = http.put(
            "/v1/models/up/torchscript", content=DIGITS_MODEL, headers={"X-Model-Input-Shape": "64"}
        )
        assert uploaded.status_code == 200, uploaded.text
        rows = digits_logits["logits"][:4]
        before = store_entries(store)

        if fault == "read-only":
            remount(volume, "ro")
        elif fault == "disk-full":
            fill_up(volume)
        else:
            for pid in serving_pids(server):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

        refusals = {
            "fit": http.post("/v1/models/m/fit", json={**fit_body, "labels": fit_body["labels"][::-1]}),
            "fit without activating": http.post("/v1/models/m/fit", json={**fit_body, "activate": False}),
            "upload a calibrator": http.post("/v1/models/m/calibrators", json=first.json()),
            "activate": http.post("/v1/models/m/calibrators/1/activate"),
            "create a model": http.put("/v1/models/new", json={"num_classes": 3}),
            "upload a model": http.put(
                "/v1/models/up/torchscript", content=DIGITS_MODEL, headers={"X-Model-Input-Shape": "64"}
            ),
            "upload a new model": http.put(
                "/v1/models/up2/torchscript", content=DIGITS_MODEL, headers={"X-Model-Input-Shape": "64"}
            ),
        }
        if fault == "read-only":  # on a full disk a delete needs no space: it may (and should) succeed
            refusals["delete a model"] = http.delete("/v1/models/up")
        for what, response in refusals.items():
            if what == "activate" and fault != "read-only":
                # the pointer already names v1 and its lock file exists: nothing to allocate, so it may succeed
                assert response.status_code in (200, 503), response.text
                continue
            body = assert_problem(response, 503, "not writable", reason)
            assert response.headers["retry-after"], what
            assert body["type"].endswith("store-unavailable"), what

        # nothing partial: no temp file, no new version, model or upload; only burnt reservation markers
        after = store_entries(store)
        assert temp_files(store) == []
        new = {entry for entry in after - before if "/calibrators/.reserved/" not in entry}
        assert new == set() and after >= before, (sorted(new), sorted(before - after))

        # the previous calibrator and model keep serving
        for _ in range(3):
            answer = http.post("/v1/models/m/calibrate", json={"logits": rows.tolist()})
            assert answer.status_code == 200, answer.text
            assert answer.json()["calibrator_version"] == 1
            np.testing.assert_allclose(
                answer.json()["probabilities"], softmax_t(rows, temperature), rtol=1e-9
            )
            predicted = http.post(
                "/v1/models/up/predict", json={"inputs": digits_logits["inputs"][:2].tolist()}
            )
            assert predicted.status_code == 200, predicted.text
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text  # still serving: it stays in the load balancer
        assert ready.json()["store"]["writable"] is False and reason in ready.json()["store"]["detail"]
        http.close()
        server.stop()
    finally:
        if context is not None:
            context.__exit__(None, None, None)


# ---------------------------------------------------------------------------------- failing TorchScript


def test_failing_models_get_502_show_in_readyz_and_do_not_stop_the_others(tmp_path, servers, digits_logits):
    server = servers(tmp_path / "store", workers=1)
    faults = {
        "raises": (Raises(), "raised"),
        "wrong-shape": (WrongShape(), "columns"),
        "nan": (ReturnsNaN(), "NaN"),
    }
    good_rows = digits_logits["inputs"][:3].tolist()
    with server.client() as http:
        for name, (module, _) in faults.items():
            uploaded = http.put(
                f"/v1/models/{name}/torchscript",
                content=scripted(module),
                headers={"X-Model-Input-Shape": "4"},
            )
            assert uploaded.status_code == 200, uploaded.text  # one row passes the smoke check
        two_rows = {"inputs": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]}
        for _ in range(5):
            for name, (_, fault) in faults.items():
                assert_problem(http.post(f"/v1/models/{name}/predict", json=two_rows), 502, name, fault)
                # the fault is the model's whichever route runs it; a fit on its outputs stores nothing
                assert_problem(
                    http.post(f"/v1/models/{name}/fit", json={**two_rows, "labels": [0, 1]}), 502, name
                )
                evaluate = http.post(f"/v1/models/{name}/evaluate", json={**two_rows, "labels": [0, 1]})
                assert_problem(evaluate, 502, name)
            other = http.post("/v1/models/digits-mlp/predict", json={"inputs": good_rows})
            assert other.status_code == 200, other.text
        ready = http.get("/readyz")
        assert ready.status_code == 200
        failing = ready.json()["failing_models"]
        assert set(faults) <= set(failing), failing
        assert "digits-mlp" not in failing and "digits-mlp" in ready.json()["models"]
        for name in faults:
            assert http.get(f"/v1/models/{name}/calibrators").json()["items"] == []
        # one good answer clears the record: the model serves again
        recovered = http.post("/v1/models/raises/predict", json={"inputs": [[1.0, 2.0, 3.0, 4.0]]})
        assert recovered.status_code == 200, recovered.text
        assert "raises" not in http.get("/readyz").json()["failing_models"]
    assert not temp_files(tmp_path / "store")


# ------------------------------------------------------------------------------------- graceful shutdown


def healthz_status(port: int) -> int | None:
    try:
        with connect(port, timeout=5) as sock:
            sock.sendall(request_head("GET", "/healthz", {"Connection": "close"}))
            return read_response(sock).status
    except (ConnectionRefusedError, ConnectionResetError, ConnectionError):
        return None


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_leaves_no_temp_files(
    tmp_path, servers, fit_body
):
    store = tmp_path / "store"
    # With a concurrency limit of 1, "/healthz answers 503" is proof that our fit is in flight.
    server = servers(store, workers=1, env={"CALIBSERVE_MAX_CONCURRENCY": "1"})
    with server.client() as http:
        assert http.put("/v1/models/m", json={"num_classes": 10}).status_code == 201
    body = httpx.Request(
        "POST",
        "http://x/",
        json=fit_body,
    ).read()
    head = request_head(
        "POST",
        "/v1/models/m/fit",
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    with connect(server.port) as in_flight:
        in_flight.sendall(head + body[: len(body) // 2])
        wait_until(lambda: healthz_status(server.port) == 503, "the fit is in flight")

        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: healthz_status(server.port) is None, "new connections are refused")
        assert server.process.poll() is None  # still running: it waits for the request in flight

        in_flight.sendall(body[len(body) // 2 :])
        response = read_response(in_flight)
    assert response.status == 201, response.body
    document = response.json()
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is "terminated by SIGTERM"
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert temp_files(store) == []
    restarted = servers(store, workers=1)
    with restarted.client() as http:
        assert http.get("/v1/models/m/calibrators/1").json() == document
        assert http.get("/v1/models/m").json()["active_calibrator"]["version"] == 1


def test_sigterm_of_a_multi_worker_server_leaves_no_temp_directory(tmp_path, servers):
    server = servers(tmp_path / "store", workers=2)
    metrics_dirs = set()
    for pid in serving_pids(server):
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                metrics_dirs.add(entry.split(b"=", 1)[1].decode())
    assert len(metrics_dirs) == 1
    (directory,) = metrics_dirs
    with server.client() as http:
        assert http.get("/metrics").status_code == 200
    server.process.send_signal(signal.SIGTERM)  # to the supervisor only, as `docker stop` does
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert not os.path.exists(directory), f"{directory} is left behind"
