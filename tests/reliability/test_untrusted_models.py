"""Untrusted uploads on a real server process (issue #11): a stalling model cannot block start-up or take
the worker's threads.

The issue's reports: a model that blocked hung its upload forever; 45 concurrent predicts on it exhausted
the thread pool so that every route but ``/healthz`` timed out; after a restart, start-up hung and the port
was never bound. The stalls here are TorchScript loops that run several times ``CALIBSERVE_MODEL_TIMEOUT_S``
and then return (see tests/api/test_untrusted_models.py); no assertion is about how long anything took.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.api.test_untrusted_models import (
    STALL_ITERATIONS,
    TIMEOUT_S,
    Linear3,
    StallsAlways,
    StallsOnInput,
    scripted,
    store_uploaded,
)
from tests.helpers.waiting import wait_until

ENV = {"CALIBSERVE_MODEL_TIMEOUT_S": str(TIMEOUT_S)}


def test_a_stored_model_that_stalls_does_not_block_start_up(tmp_path, servers):
    store = tmp_path / "store"
    store_uploaded(store, "stalls", scripted(StallsAlways()), [4])
    store_uploaded(store, "good", scripted(Linear3()), [4])
    server = servers(store, env=ENV, wait_loaded=False)  # returns once /readyz answers 200
    with server.client() as client:
        ready = client.get("/readyz").json()
        assert "stalls" in set(ready["pending_models"]) | set(ready["failing_models"])
        digits = client.post("/v1/models/digits-mlp/predict", json={"inputs": [[0.0] * 64]})
        assert digits.status_code == 200, digits.text
        wait_until(lambda: not client.get("/readyz").json()["pending_models"], "the uploads loaded")
        ready = client.get("/readyz").json()
        assert "did not answer" in ready["failing_models"]["stalls"]
        assert "good" in ready["models"]
        stalled = client.post("/v1/models/stalls/predict", json={"inputs": [[0.0] * 4]})
        assert stalled.status_code == 504, stalled.text
        assert client.post("/v1/models/good/predict", json={"inputs": [[0.0] * 4]}).status_code == 200
        wait_until(lambda: client.get("/healthz").json() == {"status": "ok"}, "the stalled check returned")
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)


def test_concurrent_predicts_on_a_stalling_model_leave_every_other_route_serving(tmp_path, servers):
    server = servers(tmp_path / "store", env=ENV)
    stall = {"inputs": [[float(STALL_ITERATIONS), 0.0, 0.0, 0.0]]}
    with server.client() as client:
        upload = client.put(
            "/v1/models/stall/torchscript",
            content=scripted(StallsOnInput()),
            headers={"X-Model-Input-Shape": "4"},
        )
        assert upload.status_code == 200, upload.text

        def predict(_: int) -> int:
            with httpx.Client(base_url=server.url, timeout=60.0) as own:
                return own.post("/v1/models/stall/predict", json=stall).status_code

        with ThreadPoolExecutor(45) as pool:
            answers = pool.map(predict, range(45))
            # while those are in flight: routes that need the worker's thread pool answer
            assert client.get("/readyz").status_code == 200
            assert client.get("/v1/models").status_code == 200
            fitted = client.post(
                "/v1/models/digits-mlp/fit",
                json={"logits": [[2.0, 0.0] + [0.0] * 8] * 4, "labels": [0, 1, 0, 0]},
            )
            assert fitted.status_code == 201, fitted.text
            assert list(answers) == [504] * 45
        health = client.get("/healthz").json()
        assert health["status"] in ("ok", "degraded")
        wait_until(lambda: client.get("/healthz").json() == {"status": "ok"}, "the stalled passes returned")
        assert client.post("/v1/models/stall/predict", json={"inputs": [[0.0] * 4]}).status_code == 200
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)


def test_sigterm_during_a_stalled_pass_exits(tmp_path, servers):
    """A stalled pass holds a daemon thread: it does not keep the process from exiting."""
    server = servers(tmp_path / "store", env=ENV)
    with server.client() as client:
        headers = {"X-Model-Input-Shape": "4"}
        assert client.put("/v1/models/stall/torchscript", content=scripted(StallsOnInput()), headers=headers)
        stall = {"inputs": [[float(STALL_ITERATIONS), 0.0, 0.0, 0.0]]}
        assert client.post("/v1/models/stall/predict", json=stall).status_code == 504
        assert "stall" in client.get("/healthz").json()["stalled_models"]
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
