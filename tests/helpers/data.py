"""Paths of the repository and the real arrays the tests use: tests/data/*.npz and the shipped digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODELS = REPO / "models"
DIGITS_DIR = SHIPPED_MODELS / "digits-mlp"
DATA_DIR = REPO / "tests" / "data"
# The digits MLP's logits are two chained length-64 float32 dot products, whose rounding depends on the kernels
# the CPU (its SIMD width), the batch size or the GPU select: about sqrt(64) = 8 ulps of the row's largest logit
# (seen: 4 ulps at |z| = 45 between two x86 machines); tests allow twice that.
DIGITS_LOGIT_ULPS = 16
# WideResNet-16-4 on CIFAR-10 (tests/data/README.md): real, over-confident logits
CIFAR10 = DATA_DIR / "netcal_wrn16-4_c10.npz"


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read once and marked read-only (callers share them)."""
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def digits_splits() -> dict[str, dict[str, np.ndarray]]:
    """The shipped digits MLP's held-out splits: ``{"validation": ..., "test": ...}`` of inputs, labels, logits."""
    return {split: load_arrays(DIGITS_DIR / f"{split}.npz") for split in ("validation", "test")}
