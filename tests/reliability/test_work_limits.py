"""Work is bounded in time: a computation past CALIBSERVE_MAX_WORK_SECONDS answers 504 naming the limit, and
one whose client went away stops (with a real server and a real socket that closes)."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import orjson
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings
from tests.helpers.servers import Server


def _stopped(url: str, reason: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'calibserve_work_stopped_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def costly_metrics_body(rows: int = 3600, bootstrap: int = 2_700) -> bytes:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(rows, 10)).round(3).tolist()
    labels = rng.integers(0, 10, size=rows).tolist()
    return orjson.dumps({"logits": logits, "labels": labels, "bootstrap": bootstrap})


def test_work_past_its_limit_is_a_504_naming_the_limit(tmp_path):
    settings = Settings(store_dir=tmp_path, models_dir=None, max_work_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        _past_its_limit(client)


def _past_its_limit(client: TestClient) -> None:
    started = time.monotonic()
    response = client.post(
        "/v1/metrics", content=costly_metrics_body(), headers={"content-type": "application/json"}
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "CALIBSERVE_MAX_WORK_SECONDS" in response.json()["detail"]
    assert elapsed < 30  # bounded: the 10,000 resamples alone take far longer here
    assert client.get("/healthz").status_code == 200


def test_work_stops_when_its_client_goes_away(tmp_path):
    body = costly_metrics_body()
    with Server(tmp_path / "store") as server:
        before = _stopped(server.url, "cancelled")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            head = (
                f"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            time.sleep(1.0)  # the server has read the body and is resampling
        deadline = time.monotonic() + 30
        while _stopped(server.url, "cancelled") <= before:
            assert time.monotonic() < deadline, "the computation went on after its client left"
            time.sleep(0.2)
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
