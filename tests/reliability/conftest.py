"""Fixtures of the reliability tests: real servers, the digits data, the quick/soak switch, the figures report.

Every test here talks to a real ``python -m service serve`` process (``tests.helpers.servers.Server``) over
127.0.0.1 unless it says otherwise. Tests that take the ``soak`` fixture run twice: quick in ``make test``,
at full scale (marked ``slow``) in ``make soak``. The figures each test measures (``record_figures`` in
``tests.helpers.figures``) are printed in a "reliability figures" section at the end of the run (and written as
JSON to ``$CALIBSERVE_FIGURES`` if set). The helpers these tests share live in ``tests/helpers``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.helpers.data import DIGITS_DIR, SHIPPED_MODELS
from tests.helpers.figures import FIGURES
from tests.helpers.servers import Server


@pytest.fixture(
    params=[pytest.param(False, id="quick"), pytest.param(True, id="soak", marks=pytest.mark.slow)]
)
def soak(request) -> bool:
    """Run a test twice: a quick variant for ``make test`` and a long one, marked slow, for ``make soak``."""
    return request.param


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, figures in FIGURES.items():
        shown = ", ".join(f"{key}={value}" for key, value in figures.items())
        terminalreporter.write_line(f"{test}: {shown}")
    target = os.environ.get("CALIBSERVE_FIGURES")
    if target:
        Path(target).write_bytes(orjson.dumps(FIGURES, option=orjson.OPT_INDENT_2))


# ------------------------------------------------------------------------------------------------- servers


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    """``servers(store, workers=, env=)`` starts a real server; every one still running is killed at the end."""
    started: list[Server] = []

    def start(store: Path, **kwargs: Any) -> Server:
        kwargs.setdefault("models", SHIPPED_MODELS)
        server = Server(store, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        # SIGKILL: this is cleanup only. A SIGTERM to the whole process group while a worker is still starting
        # was seen to leave uvicorn's supervisor blocked with both workers exited, until the 30 s stop timeout.
        with contextlib.suppress(ProcessLookupError):  # one vanished group must not spare the others
            server.stop(signal.SIGKILL)


# --------------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def digits_logits() -> dict[str, np.ndarray]:
    """The shipped digits MLP: validation logits/labels to fit on, test logits and inputs to serve."""
    with np.load(DIGITS_DIR / "validation.npz") as validation, np.load(DIGITS_DIR / "test.npz") as test:
        return {
            "fit_logits": validation["logits"].astype(np.float64),
            "fit_labels": validation["labels"],
            "logits": test["logits"].astype(np.float64),
            "inputs": test["inputs"],
        }


@pytest.fixture(scope="session")
def fit_body(digits_logits) -> dict[str, list]:
    """The JSON body of a fit on the digits validation logits."""
    return {"logits": digits_logits["fit_logits"].tolist(), "labels": digits_logits["fit_labels"].tolist()}
