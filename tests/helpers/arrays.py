"""Arrays as request bodies: ``.npy`` and ``.npz`` bytes, as ``np.save`` / ``np.savez`` write them."""

from __future__ import annotations

import io

import numpy as np


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
