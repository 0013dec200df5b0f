"""A deterministic synthetic multi-label set (tests/data holds no real multi-label set).

Each label ``k`` has true logits ``u_k ~ N(bias_k, 2^2)`` and outcomes ``y_k ~ Bernoulli(sigmoid(u_k))``; the
model's logits are ``z_k = TEMPERATURES[k] * u_k``, so temperature scaling of label ``k`` should find
``T_k ~= TEMPERATURES[k]`` (overconfident labels have ``T > 1``, underconfident ones ``T < 1``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

TEMPERATURES = (0.6, 1.0, 1.8, 3.0, 2.2)
BIASES = (-1.5, 0.0, 0.5, -0.5, 1.0)


def multilabel_set(n: int = 2000, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (n, 5) float64, labels (n, 5) int8 0/1 matrix)``, miscalibrated by :data:`TEMPERATURES`."""
    rng = np.random.default_rng(seed)
    k = len(TEMPERATURES)
    truth = rng.normal(size=(n, k)) * 2.0 + np.asarray(BIASES)
    labels = (rng.random((n, k)) < expit(truth)).astype(np.int8)
    return truth * np.asarray(TEMPERATURES), labels


def index_lists(labels: np.ndarray) -> list[list[int]]:
    """The same labels as one list of label indices per row."""
    return [np.flatnonzero(row).tolist() for row in labels]
