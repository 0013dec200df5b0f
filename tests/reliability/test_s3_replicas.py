"""Two real ``calibserve serve`` processes on one S3 bucket behave as one service: on moto's real S3 server,
and on SeaweedFS (whose conditional writes are atomic under races; moto checks them without a lock).

- Concurrent fits and activations through both, one replica SIGKILLed in the middle: afterwards every
  acknowledged version is in the bucket, byte for byte the document its answer carried; no number was handed
  out twice; the pointer names an intact version that was acknowledged (or written by a request that the
  kill cut off: in doubt, never invented).
- Propagation: a fit answered by replica A is served by replica B once its cached view is refreshed
  (``CALIBSERVE_STORE_REFRESH_S``); the delay is recorded as a figure, not asserted (no timing thresholds).
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.figures import record_figures
from tests.helpers.numerics import softmax_t
from tests.helpers.s3 import SEAWEEDFS_BUCKET, S3Endpoint, check_bucket
from tests.helpers.waiting import wait_until

MODELS = ("alpha", "beta")
CLIENT_THREADS = 4
REFRESH_S = 0.2


@dataclass(frozen=True)
class Bucket:
    endpoint: S3Endpoint
    name: str
    prefix: str


@pytest.fixture(params=["moto", "seaweedfs"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    if request.param == "moto":
        endpoint = request.getfixturevalue("moto_s3")
        return Bucket(endpoint, endpoint.new_bucket(), "prod")
    return Bucket(request.getfixturevalue("seaweedfs"), SEAWEEDFS_BUCKET, f"replicas-{uuid.uuid4().hex[:8]}")


def start_replicas(servers: Any, bucket: Bucket, tmp_path: Path) -> list[Any]:
    env = {
        **bucket.endpoint.environment,
        "CALIBSERVE_STORE_URL": f"s3://{bucket.name}/{bucket.prefix}",
        "CALIBSERVE_STORE_REFRESH_S": str(REFRESH_S),
    }
    models = tmp_path / "no-models"
    models.mkdir(exist_ok=True)
    # Each replica has its own local state directory (another host): only the bucket is shared.
    return [servers(tmp_path / f"local-{name}", models=models, env=env) for name in ("a", "b")]


def client_loop(urls: list[str], seed: int, data: dict, ledger: dict, stop: threading.Event) -> None:
    """Fit (mostly activating) and activate acknowledged versions, on a random replica each time."""
    rng = random.Random(seed)
    logits, labels = data["fit_logits"], data["fit_labels"]
    clients = [httpx.Client(base_url=url, timeout=30.0) for url in urls]
    try:
        while not stop.is_set():
            replica = rng.randrange(len(clients))
            http = clients[replica]
            model = rng.choice(MODELS)
            with ledger["lock"]:
                known = [version for name, version, _ in ledger["acknowledged"] if name == model]
            try:
                if known and rng.random() < 0.3:
                    version = rng.choice(known)
                    response = http.post(f"/v1/models/{model}/calibrators/{version}/activate")
                    if response.status_code == 200:
                        with ledger["lock"]:
                            ledger["activated"].append((model, version))
                    elif response.status_code != 409:  # a lost compare-and-swap race may answer 409
                        ledger["unexpected"].append(f"activate: {response.status_code} {response.text}")
                    continue
                rows = np.sort(rng.sample(range(len(labels)), rng.randint(40, len(labels))))
                body = {"logits": logits[rows].tolist(), "labels": labels[rows].tolist()}
                response = http.post(f"/v1/models/{model}/fit", json={**body, "activate": rng.random() < 0.7})
            except httpx.HTTPError:
                if ledger["killed"].is_set() and replica == 0:
                    with ledger["lock"]:
                        ledger["cut_off"] += 1
                    clients[0] = clients[-1]  # the killed replica is gone: keep going on the other one
                    continue
                raise
            if response.status_code != 201:
                ledger["unexpected"].append(f"fit: {response.status_code} {response.text}")
                continue
            document = response.json()
            with ledger["lock"]:
                ledger["acknowledged"].append((model, document["version"], document))
    except Exception as exc:  # reported to the test, which fails
        ledger["unexpected"].append(repr(exc))
    finally:
        for client in clients:
            client.close()


def test_two_replicas_on_one_bucket_survive_concurrent_writes_and_a_sigkill(
    servers, bucket: Bucket, tmp_path: Path, digits_logits
) -> None:
    first, second = start_replicas(servers, bucket, tmp_path)
    with first.client() as http:
        for model in MODELS:
            assert http.put(f"/v1/models/{model}", json={"num_classes": 10}).status_code == 201
    ledger: dict[str, Any] = {
        "lock": threading.Lock(),
        "acknowledged": [],
        "activated": [],
        "unexpected": [],
        "cut_off": 0,
        "killed": threading.Event(),
    }
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=client_loop, args=([first.url, second.url], seed, digits_logits, ledger, stop)
        )
        for seed in range(CLIENT_THREADS)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(ledger["acknowledged"]) >= 12, "12 acknowledged fits before the kill", timeout=120)
    ledger["killed"].set()
    first.stop(signal.SIGKILL)
    acknowledged_at_kill = len(ledger["acknowledged"])
    wait_until(
        lambda: len(ledger["acknowledged"]) >= acknowledged_at_kill + 8,
        "8 more acknowledged fits through the surviving replica",
        timeout=120,
    )
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not ledger["unexpected"], ledger["unexpected"][:3]

    state = check_bucket(bucket.endpoint.client(), bucket.name, bucket.prefix)
    pairs = [(model, version) for model, version, _ in ledger["acknowledged"]]
    assert len(pairs) == len(set(pairs)), "a version number was acknowledged twice"
    for model, version, document in ledger["acknowledged"]:
        assert state[model]["versions"].get(version) == document, f"acknowledged {model} v{version} differs"
    in_doubt = {(model, version) for model in MODELS for version in state[model]["versions"]} - set(pairs)
    assert len(in_doubt) <= CLIENT_THREADS  # at most one cut-off fit per client thread
    for model in MODELS:
        active = state[model]["active"]
        assert active is None or (model, active) in set(pairs) | in_doubt

    # The survivor serves each model's active version, as softmax(z / T) with that version's T.
    rows = digits_logits["logits"][:5]
    with second.client() as http:
        for model in MODELS:
            active = state[model]["active"]
            wait_until(
                lambda model=model, active=active: (
                    http.post(f"/v1/models/{model}/calibrate", json={"logits": rows.tolist()}).json()[
                        "calibrator_version"
                    ]
                    == active
                ),
                f"{model}: the survivor serves active version {active}",
                timeout=30,
            )
            if active is not None:
                answer = http.post(f"/v1/models/{model}/calibrate", json={"logits": rows.tolist()}).json()
                temperature = state[model]["versions"][active]["temperature"]
                np.testing.assert_allclose(answer["probabilities"], softmax_t(rows, temperature), rtol=1e-9)
    record_figures(
        f"s3-replicas-sigkill ({bucket.prefix})",
        acknowledged_fits=len(pairs),
        activations=len(ledger["activated"]),
        versions_in_bucket=sum(len(entry["versions"]) for entry in state.values()),
        cut_off_requests=ledger["cut_off"],
        in_doubt=len(in_doubt),
    )


def test_a_fit_on_one_replica_is_served_by_the_other_after_a_refresh(
    servers, moto_s3: S3Endpoint, tmp_path: Path, fit_body
) -> None:
    first, second = start_replicas(servers, Bucket(moto_s3, moto_s3.new_bucket(), "prod"), tmp_path)
    rows = {"logits": [[2.0, 0.5, -1.0] + [0.0] * 7]}
    delays = []
    with first.client() as a, second.client() as b:
        assert a.put("/v1/models/m", json={"num_classes": 10}).status_code == 201
        assert b.post("/v1/models/m/calibrate", json=rows).json()["calibrator_version"] is None
        for _ in range(5):
            fitted = a.post("/v1/models/m/fit", json=fit_body)
            assert fitted.status_code == 201, fitted.text
            version = fitted.json()["version"]
            started = time.monotonic()
            wait_until(
                lambda version=version: (
                    b.post("/v1/models/m/calibrate", json=rows).json()["calibrator_version"] == version
                ),
                f"replica B serves version {version}",
                timeout=30,
            )
            delays.append(time.monotonic() - started)
            # ?version=N is exact on both at once, whatever their cached views
            pinned = b.post(f"/v1/models/m/calibrate?version={version}", json=rows).json()
            assert pinned["calibrator_version"] == version
    record_figures(
        "s3-propagation",
        refresh_s=REFRESH_S,
        max_delay_s=round(max(delays), 3),
        median_delay_s=round(sorted(delays)[len(delays) // 2], 3),
    )
