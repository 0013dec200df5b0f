"""Fixtures shared by every test package: the real classifier outputs under ``tests/data``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference_data() -> Callable[[str], dict[str, np.ndarray]]:
    """``reference_data(name)``: the arrays of ``tests/data/<name>`` (``logits_val``, ``labels_val``,
    ``logits_test``, ``labels_test``; see ``tests/data/README.md``), loaded once per session, read-only."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(DATA_DIR / name) as archive:
                arrays = {key: archive[key] for key in archive.files}
            for array in arrays.values():
                array.flags.writeable = False
            cache[name] = arrays
        return cache[name]

    return load
