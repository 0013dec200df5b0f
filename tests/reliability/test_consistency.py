"""Consistency across workers and operations, with real servers: a delete is a delete everywhere, a fit
never brings a deleted model back, and a port is served by one service only."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

from service.cli import main as cli_main
from service.config import parse_api_keys
from tests.helpers.data import REPO
from tests.helpers.processes import wait_for_workers
from tests.helpers.servers import Server, free_port
from tests.helpers.torchscript import Linear, scripted


def fresh_request(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection, so that the kernel may give it to either worker."""
    with httpx.Client(base_url=url, timeout=30.0) as http:
        return http.request(method, path, **kwargs)


def settled(url: str, timeout: float = 60.0) -> None:
    """Wait until ten fresh connections in a row find a worker ready with no model still loading: a worker
    that starts after an upload loads it in the background and answers 503 (Retry-After) meanwhile."""
    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < 10:
        assert time.monotonic() < deadline, "the workers did not settle"
        ready = fresh_request(url, "GET", "/readyz")
        in_a_row = in_a_row + 1 if ready.status_code == 200 and not ready.json()["pending_models"] else 0


def test_a_deleted_uploaded_model_is_gone_from_every_worker(tmp_path):
    with Server(tmp_path / "store", workers=2) as server:
        wait_for_workers(server, 2)
        put = fresh_request(server.url, "PUT", "/v1/models/mwts/torchscript", content=scripted(Linear()))
        assert put.status_code == 200, put.text
        settled(server.url)
        body = {"inputs": [[1.0, 2.0, 3.0, 4.0]]}
        served = [fresh_request(server.url, "POST", "/v1/models/mwts/predict", json=body) for _ in range(20)]
        assert all(response.status_code == 200 for response in served), [
            (r.status_code, r.text[:120]) for r in served if r.status_code != 200
        ]
        assert fresh_request(server.url, "DELETE", "/v1/models/mwts").status_code == 204
        after = [fresh_request(server.url, "POST", "/v1/models/mwts/predict", json=body) for _ in range(20)]
        assert [response.status_code for response in after] == [404] * 20
        ready = [fresh_request(server.url, "GET", "/v2/models/mwts/ready").status_code for _ in range(10)]
        assert ready == [404] * 10


def test_a_fit_never_brings_back_a_model_deleted_while_it_ran(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(150_000, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=150_000)
    buffer = io.BytesIO()
    np.savez(buffer, logits=logits, labels=labels)
    with Server(tmp_path / "store") as server, server.client() as http:
        assert http.put("/v1/models/dd", json={"num_classes": 10}).status_code == 201
        answers: list[httpx.Response] = []
        fit = threading.Thread(
            target=lambda: answers.append(
                fresh_request(
                    server.url,
                    "POST",
                    "/v1/models/dd/fit?method=matrix",
                    content=buffer.getvalue(),
                    headers={"content-type": "application/x-npz"},
                )
            )
        )
        fit.start()
        time.sleep(0.5)
        assert http.delete("/v1/models/dd").status_code == 204
        fit.join(120)
        # whichever came first, the model stays deleted: a fit that lost the race is a 404
        assert answers and answers[0].status_code in (201, 404), answers[0].text
        assert http.get("/v1/models/dd").status_code == 404
        assert not (tmp_path / "store" / "dd").exists()


def serve_on(port: int, store) -> subprocess.CompletedProcess:
    """``calibserve serve --workers 2`` on ``port``, expected to refuse and exit."""
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "2"]
    command += ["--store-dir", str(store)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_second_server_refuses_a_port_that_is_served(tmp_path):
    with Server(tmp_path / "one", workers=2) as server:
        second = serve_on(server.port, tmp_path / "two")
        assert second.returncode == 2, second.stderr
        assert f"127.0.0.1:{server.port} is already served by another calibserve" in second.stderr
        assert fresh_request(server.url, "GET", "/healthz").status_code == 200
    port = free_port()
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", port))
        foreign.listen()
        third = serve_on(port, tmp_path / "three")
        assert third.returncode == 2, third.stderr
        assert f"127.0.0.1:{port} is already in use by another process" in third.stderr
        assert "Traceback" not in third.stderr


def test_quiet_works_before_and_after_the_command(tmp_path, capsys):
    logits = tmp_path / "logits.npy"
    labels = tmp_path / "labels.npy"
    np.save(logits, np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]], dtype=np.float32))
    np.save(labels, np.array([0, 1, 0]))
    out = tmp_path / "cal.json"
    for argv in (
        ["-q", "fit", "--logits", str(logits), "--labels", str(labels), "--out", str(out)],
        ["fit", "-q", "--logits", str(logits), "--labels", str(labels), "--out", str(out)],
    ):
        assert cli_main(argv) == 0
        assert capsys.readouterr().err == ""
    assert cli_main(["fit", "--logits", str(logits), "--labels", str(labels), "--out", str(out)]) == 0
    assert capsys.readouterr().err != ""  # without -q it reports


def test_api_key_mistakes_are_named_without_echoing_the_key():
    for value, words in (
        ("adm", "entry 1 has no role"),
        ("k1:admin,k2:reader", "entry 2 has role 'reader'"),
        ("k1:admin,k1:read", "entry 2 repeats an earlier key"),
        (":admin", "entry 1 has an empty key"),
    ):
        try:
            parse_api_keys(value)
        except ValueError as exc:
            assert words in str(exc), exc
            assert "k1" not in str(exc) and "adm'" not in str(exc)
        else:
            raise AssertionError(f"{value!r} was accepted")
    assert parse_api_keys("a:admin, b:read,") == {"a": "admin", "b": "read"}
