"""Fixtures that start the real application (TestClient with lifespan) on a temporary store."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODELS = REPO / "models"
DATA = REPO / "tests" / "data"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A copy of the shipped models directory (the digits MLP), so tests may add broken models to it."""
    target = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, target, ignore=shutil.ignore_patterns("*.npz"))
    return target


@pytest.fixture
def make_client(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(*, wait_loaded: bool = True, **overrides) -> TestClient:
        """A started client; ``wait_loaded``: also wait for the uploaded models start-up loads in the
        background (so that a test that restarts finds them loaded, not pending)."""
        options = {"store_dir": tmp_path / "store", "models_dir": models_dir, "device": "cpu", **overrides}
        client = TestClient(create_app(Settings(**options)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if wait_loaded:
            assert client.app.state.dataplane.state.wait_loaded(60), "uploaded models did not load"
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture(scope="session")
def cifar10() -> dict[str, np.ndarray]:
    """WideResNet-16-4 on CIFAR-10 (see tests/data/README.md): real over-confident logits."""
    with np.load(DATA / "netcal_wrn16-4_c10.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def digits() -> dict[str, dict[str, np.ndarray]]:
    """The shipped digits MLP's held-out splits (inputs, labels, logits)."""
    out = {}
    for split in ("validation", "test"):
        with np.load(SHIPPED_MODELS / "digits-mlp" / f"{split}.npz") as data:
            out[split] = {key: data[key] for key in data.files}
    return out


def assert_problem(response, status: int, *needles: str) -> dict:
    """The response is problem+json with ``status`` and a detail that mentions every needle."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    return body
