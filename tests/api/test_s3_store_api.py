"""The application on the S3 store (moto's real S3 server): the v1 routes that read and write the store, the
store's lines in ``/readyz``, and a missing bucket (503 on writes, the reason in ``/readyz``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings
from service.store_s3 import S3CalibratorStore
from tests.helpers.numerics import softmax_t
from tests.helpers.s3 import S3Endpoint


def _client(tmp_path: Path, url: str) -> TestClient:
    settings = Settings(store_url=url, store_refresh_s=0.05, store_dir=tmp_path / "local", models_dir=None)
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.__enter__()
    return client


@pytest.fixture
def fit_body() -> dict:
    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((300, 4))
    return {"logits": logits.tolist(), "labels": rng.integers(0, 4, 300).tolist()}


def test_the_v1_store_routes_on_s3(moto_s3: S3Endpoint, tmp_path: Path, fit_body: dict) -> None:
    url = f"s3://{moto_s3.new_bucket()}/app"
    client = _client(tmp_path, url)
    try:
        assert isinstance(client.app.state.dataplane.state.store, S3CalibratorStore)
        assert client.put("/v1/models/m", json={"num_classes": 4}).status_code == 201
        first = client.post("/v1/models/m/fit", json=fit_body).json()
        second = client.post("/v1/models/m/fit", json={**fit_body, "activate": False}).json()
        assert (first["version"], second["version"]) == (1, 2)
        rows = [[1.0, 0.0, -1.0, 2.0]]
        answer = client.post("/v1/models/m/calibrate", json={"logits": rows}).json()
        assert answer["calibrator_version"] == 1
        np.testing.assert_allclose(answer["probabilities"], softmax_t(np.array(rows), first["temperature"]))
        pinned = client.post("/v1/models/m/calibrate?version=2", json={"logits": rows}).json()
        assert pinned["calibrator_version"] == 2
        listed = client.get("/v1/models/m/calibrators").json()
        assert [item["version"] for item in listed["items"]] == [2, 1] and listed["active_version"] == 1
        assert client.get("/v1/models/m/calibrators/2").json() == second
        assert client.post("/v1/models/m/calibrators/2/activate").status_code == 200
        assert client.post("/v1/models/m/calibrate", json={"logits": rows}).json()["calibrator_version"] == 2
        assert client.delete("/v1/models/m/calibrators/2").status_code == 409  # the active one
        assert client.delete("/v1/models/m/calibrators/1").status_code == 204
        assert [m["name"] for m in client.get("/v1/models").json()["items"]] == ["m"]
        ready = client.get("/readyz").json()
        assert ready["store"] == {"writable": True, "detail": None, "view_age_s": 0.0}
    finally:
        client.__exit__(None, None, None)
    # a restarted server (a new process) finds everything in the bucket
    again = _client(tmp_path, url)
    try:
        assert (
            again.post("/v1/models/m/calibrate", json={"logits": [[0.0] * 4]}).json()["calibrator_version"]
            == 2
        )
    finally:
        again.__exit__(None, None, None)


def test_a_missing_bucket_is_in_readyz_and_writes_answer_503(
    moto_s3: S3Endpoint, tmp_path: Path, fit_body: dict
) -> None:
    client = _client(tmp_path, "s3://no-such-bucket-here/app")
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 200  # live, serving what it can: a load balancer keeps it
        store = ready.json()["store"]
        assert store["writable"] is False and "bucket 'no-such-bucket-here' does not exist" in store["detail"]
        answer = client.put("/v1/models/m", json={"num_classes": 4})
        assert answer.status_code == 503, answer.text
        assert "does not exist" in answer.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def test_a_torchscript_upload_through_one_replica_is_served_by_another(
    moto_s3: S3Endpoint, tmp_path: Path
) -> None:
    from tests.helpers.torchscript import Linear, scripted

    url = f"s3://{moto_s3.new_bucket()}/app"
    first, second = _client(tmp_path / "a", url), _client(tmp_path / "b", url)
    try:
        upload = scripted(Linear(seed=0))
        answer = first.put("/v1/models/up/torchscript", content=upload, headers={"X-Model-Input-Shape": "4"})
        assert answer.status_code == 200, answer.text
        inputs = {"inputs": [[1.0, 2.0, 3.0, 4.0]]}
        expected = first.post("/v1/models/up/predict", json=inputs).json()
        served = second.post("/v1/models/up/predict", json=inputs)  # downloads it to its own local cache
        assert served.status_code == 200, served.text
        assert served.json()["probabilities"] == expected["probabilities"]
        assert (tmp_path / "b" / "local" / "s3-cache" / "up" / "model.pt").read_bytes() == upload
    finally:
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)


def test_with_the_bucket_gone_calibrate_serves_the_cached_view_and_says_how_old(
    tmp_path: Path, fit_body: dict
) -> None:
    from tests.helpers.s3 import moto_server

    with moto_server() as endpoint:  # a server of its own: this test stops it
        bucket = endpoint.new_bucket()
        environment = pytest.MonkeyPatch()
        for key, value in endpoint.environment.items():
            environment.setenv(key, value)
        try:
            client = _client(tmp_path, f"s3://{bucket}/app")
            assert client.put("/v1/models/m", json={"num_classes": 4}).status_code == 201
            version = client.post("/v1/models/m/fit", json=fit_body).json()["version"]
            rows = {"logits": [[1.0, 0.0, -1.0, 2.0]]}
            before = client.post("/v1/models/m/calibrate", json=rows)
            assert "X-Store-View-Age" not in before.headers
        finally:
            environment.undo()
    try:
        for _ in range(3):  # past the refresh bound: the cached view is all there is
            time.sleep(0.1)
            after = client.post("/v1/models/m/calibrate", json=rows)
            assert after.status_code == 200, after.text
            assert after.json() == before.json() and after.json()["calibrator_version"] == version
        assert float(after.headers["X-Store-View-Age"]) >= 0.1
        fit = client.post("/v1/models/m/fit", json=fit_body)
        assert fit.status_code == 503 and "unreachable" in fit.json()["detail"]
        store = client.get("/readyz").json()["store"]
        assert store["writable"] is False and store["view_age_s"] > 0
    finally:
        client.__exit__(None, None, None)
