"""Softmax in log space, with the binary single-column convention.

A single logit column ``z`` is a binary model: it is the logit of class 1, so its two-class form is
``[0, z]`` (``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``). Every function here returns two columns for
it, so downstream code only ever sees full probability rows.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax as _scipy_log_softmax


def two_column_logits(logits: np.ndarray) -> np.ndarray:
    """Expand a single binary logit column to ``[0, z]``; other shapes are returned unchanged."""
    if logits.shape[1] != 1:
        return logits
    return np.concatenate([np.zeros_like(logits), logits], axis=1)


def two_column_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Expand a single column ``p = P(y=1)`` to ``[1 - p, p]``; other shapes are returned unchanged."""
    if probabilities.shape[1] != 1:
        return probabilities
    return np.concatenate([1.0 - probabilities, probabilities], axis=1)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log softmax(z / T)`` row-wise in float64; stable for logits of any finite size."""
    z = two_column_logits(np.asarray(logits, dtype=np.float64))
    if temperature != 1.0:
        z = z / temperature
    return _scipy_log_softmax(z, axis=1)


def softmax(logits: np.ndarray, temperature: float = 1.0, *, dtype: type = np.float64) -> np.ndarray:
    """``softmax(z / T)`` row-wise; rows sum to 1; one logit column gives two probability columns."""
    logits = two_column_logits(np.asarray(logits))
    # one new array, cast and scaled in one pass; everything after works in it, in place
    if temperature != 1.0:
        z = np.multiply(logits, dtype(1.0 / temperature), dtype=dtype)
    else:
        z = np.array(logits, dtype=dtype)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z
