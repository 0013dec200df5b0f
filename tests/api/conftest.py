"""Fixtures that start the real application (TestClient with lifespan) on a temporary store."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings
from tests.helpers.data import SHIPPED_MODELS


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


@pytest.fixture
def cifar_model(client) -> TestClient:
    """The client, with a 10-class logits-only model ``wrn`` (for the CIFAR-10 logits) and no calibrator yet."""
    assert client.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
    return client
