"""The torch side of the calibrators: ``torch.nn.Module`` twins of their transforms, for TorchScript export.

Each calibrator's :meth:`~service.core.calibrators.base.BaseCalibrator.torch_module` builds one of these from
its fitted parameters (this module is imported only then, so that fitting and serving logits never import
torch through it). Every module maps logits ``(N, C)`` to probabilities ``(N, K)`` exactly as the numpy
``transform`` does: in float64, one logit column read as the binary ``[0, z]``, the same formulas. Answers
are float64 for float64 logits, float32 otherwise. Rows beyond ``MAX_ABS_LOGIT`` are scaled into it by
:func:`into_domain` (as the service's transforms do with ``validation.scale_into_domain``), so every
finite input gives finite rows that sum to 1. The one-vs-rest curves (isotonic, histogram) are stored as
padded per-class tensors and evaluated with ``torch.searchsorted``. All of them can be compiled to
TorchScript (:mod:`service.export` does, through :mod:`service.registry`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

DOMAIN_LIMIT = 1e100
"""The limit :func:`into_domain` scales rows into: ``service.core.validation.MAX_ABS_LOGIT``."""


def into_domain(z: torch.Tensor) -> torch.Tensor:
    """float64 logits with every row of magnitude above ``MAX_ABS_LOGIT`` scaled by a power of two into it.

    The twin of ``service.core.validation.scale_into_domain``, which the service's transforms use; without
    it ``z / T``, ``W z`` or ``z1 - z0`` of logits near 1e308 overflow to Inf and the
    softmax answers NaN. A power of two scales exactly, so the row keeps its order and ratios. At that
    scale any two distinct logits of a row differ by more than 1e84, so softmax, temperature scaling and
    the one-vs-rest curves answer the same one-hot (or tied) row as they would on the unscaled logits;
    vector, matrix and Platt scaling's biases weigh relatively more after scaling, which can only matter
    where the scaled scores tie. float32 logits (at most 3.4e38) are never scaled.
    """
    limit = 1e100  # MAX_ABS_LOGIT (TorchScript cannot read a global; a test checks they agree)
    magnitude = z.abs().amax(dim=1, keepdim=True)
    outside = (magnitude > limit) & torch.isfinite(magnitude)
    if not bool(outside.any()):
        return z
    exponent = torch.ceil(torch.log2(torch.where(outside, magnitude, torch.ones_like(magnitude)) / limit))
    # rows within the limit keep their logits (exponent 0): without this, a batch with one row beyond the
    # limit multiplied every other row by 2**332 (one-hot answers)
    exponent = torch.where(outside, exponent, torch.zeros_like(exponent))
    return z * torch.exp2(-exponent)


def answer_dtype(probabilities: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``probabilities`` in float64 for float64 logits, float32 otherwise."""
    if logits.dtype == torch.float64:
        return probabilities
    return probabilities.to(torch.float32)


def two_columns(z: torch.Tensor) -> torch.Tensor:
    """One logit column ``z`` read as the binary ``[0, z]``; other widths unchanged."""
    if z.shape[1] == 1:
        return torch.cat([torch.zeros_like(z), z], dim=1)
    return z


def binary_margin(z: torch.Tensor) -> torch.Tensor:
    """The binary logit ``z1 - z0`` (or the single column)."""
    if z.shape[1] == 1:
        return z[:, 0]
    return z[:, 1] - z[:, 0]


def float64_buffer(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def padded_rows(
    rows: list[np.ndarray], *, fill_last: bool, minimum: int, pad: float = math.inf
) -> torch.Tensor:
    """Stack 1-D arrays of different lengths, padding each with its last value (or ``pad``)."""
    width = max(minimum, max((row.size for row in rows), default=0))
    out = np.full((len(rows), width), pad, dtype=np.float64)
    for k, row in enumerate(rows):
        out[k, : row.size] = row
        if fill_last and row.size:
            out[k, row.size :] = row[-1]
    return torch.as_tensor(out)


class SoftmaxModule(torch.nn.Module):
    """No calibrator: the plain softmax (identity calibration)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        z = two_columns(into_domain(logits.to(torch.float64)))
        return answer_dtype(torch.softmax(z, dim=1), logits)


class TemperatureModule(torch.nn.Module):
    """``softmax(z / T)``."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.inverse_temperature = 1.0 / float(temperature)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        z = two_columns(into_domain(logits.to(torch.float64)))
        # the row maximum first: z - max(z) is at most 0, so a small T cannot overflow it to Inf
        z = z - z.amax(dim=1, keepdim=True)
        return answer_dtype(torch.softmax(z * self.inverse_temperature, dim=1), logits)


class EnsembleTemperatureModule(torch.nn.Module):
    """``w1 softmax(z / T) + w2 softmax(z) + w3 / K`` (ensemble temperature scaling)."""

    def __init__(self, temperature: float, weights: np.ndarray) -> None:
        super().__init__()
        self.inverse_temperature = 1.0 / float(temperature)
        self.register_buffer("weights", float64_buffer(weights))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        z = two_columns(into_domain(logits.to(torch.float64)))
        z = z - z.amax(dim=1, keepdim=True)
        mixed = (
            self.weights[0] * torch.softmax(z * self.inverse_temperature, dim=1)
            + self.weights[1] * torch.softmax(z, dim=1)
            + self.weights[2] / z.shape[1]
        )
        return answer_dtype(mixed, logits)


class AffineModule(torch.nn.Module):
    """``softmax(W x + b)`` (``full``, matrix) or ``softmax(w * x + b)`` (vector); ``x = [0, z1 - z0]`` for
    binary models, or ``x = log_softmax(z)`` (``log_probabilities``: Dirichlet calibration)."""

    def __init__(
        self, weights: np.ndarray, bias: np.ndarray, *, full: bool, log_probabilities: bool = False
    ) -> None:
        super().__init__()
        self.full = full
        self.log_probabilities = log_probabilities
        self.register_buffer("weights", float64_buffer(weights))
        self.register_buffer("bias", float64_buffer(bias))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        z = into_domain(logits.to(torch.float64))
        if self.log_probabilities:  # Dirichlet calibration: the map of ln softmax(z)
            x = torch.log_softmax(two_columns(z), dim=1)
        elif z.shape[1] <= 2:
            margin = binary_margin(z)
            x = torch.stack([torch.zeros_like(margin), margin], dim=1)
        else:
            x = z
        scores = x @ self.weights.T + self.bias if self.full else x * self.weights + self.bias
        return answer_dtype(torch.softmax(scores, dim=1), logits)


class PlattModule(torch.nn.Module):
    """``P(y = 1) = sigmoid(a (z1 - z0) + b)``."""

    def __init__(self, slope: float, intercept: float) -> None:
        super().__init__()
        self.slope = float(slope)
        self.intercept = float(intercept)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        positive = torch.sigmoid(
            self.slope * binary_margin(into_domain(logits.to(torch.float64))) + self.intercept
        )
        return answer_dtype(torch.stack([1.0 - positive, positive], dim=1), logits)


class BetaModule(torch.nn.Module):
    """``logit P(y = 1) = a ln s - b ln(1 - s) + c`` with ``s = sigmoid(z1 - z0)`` (beta calibration)."""

    def __init__(self, a: float, b: float, c: float) -> None:
        super().__init__()
        self.a = float(a)
        self.b = float(b)
        self.c = float(c)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        margin = binary_margin(into_domain(logits.to(torch.float64)))
        log_s = torch.nn.functional.logsigmoid(margin)
        log_not_s = torch.nn.functional.logsigmoid(-margin)
        positive = torch.sigmoid(self.a * log_s - self.b * log_not_s + self.c)
        return answer_dtype(torch.stack([1.0 - positive, positive], dim=1), logits)


class OneVsRestModule(torch.nn.Module):
    """Per-class curves on the softmax probabilities, one-vs-rest (isotonic regression or histogram binning).

    ``knots`` and ``values`` are ``(curves, width)`` float64 tensors (see :func:`padded_rows`).
    ``interpolate=True`` (isotonic): :func:`numpy.interp` on the knots (clipped beyond them); rows padded
    with their last knot, which changes nothing. ``interpolate=False`` (histogram): ``knots`` are the inner
    bin edges, bin ``searchsorted(inner_edges, p, side="left")``, padded with ``+inf``, which no probability
    reaches. Binary models map ``P(y = 1)`` only; otherwise rows are renormalised, and a row that maps to all
    zeros keeps its softmax row.
    """

    def __init__(self, knots: torch.Tensor, values: torch.Tensor, *, interpolate: bool) -> None:
        super().__init__()
        self.interpolate = interpolate
        self.register_buffer("knots", knots)
        self.register_buffer("values", values)

    def _curves(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (C, N) -> calibrated (C, N), curve c applied to row c."""
        if not self.interpolate:
            index = torch.searchsorted(self.knots, scores.contiguous(), right=False)
            return torch.gather(self.values, 1, index)
        n_knots = self.knots.shape[1]
        upper = torch.searchsorted(self.knots, scores.contiguous(), right=True).clamp(1, n_knots - 1)
        lower = upper - 1
        x0 = torch.gather(self.knots, 1, lower)
        x1 = torch.gather(self.knots, 1, upper)
        y0 = torch.gather(self.values, 1, lower)
        y1 = torch.gather(self.values, 1, upper)
        width = x1 - x0
        step = torch.where(
            width > 0, (scores - x0) / torch.where(width > 0, width, torch.ones_like(width)), 0.0
        )
        out = y0 + step * (y1 - y0)
        first = self.knots[:, :1]
        last = self.knots[:, n_knots - 1 :]
        out = torch.where(scores <= first, self.values[:, :1], out)
        return torch.where(scores >= last, self.values[:, n_knots - 1 :], out)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(two_columns(into_domain(logits.to(torch.float64))), dim=1)
        if p.shape[1] == 2:
            positive = self._curves(p[:, 1].unsqueeze(0))[0]
            return answer_dtype(torch.stack([1.0 - positive, positive], dim=1), logits)
        calibrated = self._curves(p.T).T
        sums = calibrated.sum(dim=1, keepdim=True)
        calibrated = torch.where(sums <= 0, p, calibrated)
        return answer_dtype(calibrated / calibrated.sum(dim=1, keepdim=True), logits)


class PerLabelModule(torch.nn.Module):
    """A multi-label model's per-label calibration: column ``k`` through binary module ``k``, whose
    ``P(y = 1)`` is kept; logits ``(N, K)`` to probabilities ``(N, K)`` that need not sum to 1."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.labels = torch.nn.ModuleList(modules)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        columns: list[torch.Tensor] = []
        for k, module in enumerate(self.labels):
            columns.append(module(logits[:, k : k + 1])[:, 1])
        return torch.stack(columns, dim=1)


class SigmoidModule(torch.nn.Module):
    """A multi-label model without a calibrator: the sigmoid of each logit."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return answer_dtype(torch.sigmoid(logits.to(torch.float64)), logits)


class VennAbersModule(torch.nn.Module):
    """Inductive Venn–Abers: ``p = p1 / (1 - p0 + p1)``, ``p0`` and ``p1`` looked up on per-curve grids.

    ``grid`` is ``(curves, width)`` padded with ``+inf``; ``p0`` and ``p1`` are ``(curves, width + 1)``. The
    score is the margin ``z1 - z0`` for binary models (one curve), else each class's ``z_k - max_{j != k}
    z_j`` (``venn_abers.rival_margins``: a maximum and a subtraction, the same float64 bits as numpy's), rounded
    to ``precision`` decimals when that is not -1; ``p0`` at ``searchsorted(right=True)``, ``p1`` at
    ``searchsorted(right=False)``; more classes are divided by their row sum.
    """

    def __init__(self, grid: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, *, precision: int) -> None:
        super().__init__()
        self.precision = int(precision)
        self.register_buffer("grid", grid)
        self.register_buffer("p0", p0)
        self.register_buffer("p1", p1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        z = into_domain(logits.to(torch.float64))
        if z.shape[1] <= 2:
            scores = binary_margin(z).unsqueeze(0)
        else:
            top_two = torch.topk(z, 2, dim=1).values
            first, second = top_two[:, :1], top_two[:, 1:]
            scores = (z - torch.where(z == first, second, first)).T
        if self.precision >= 0:
            scale = 10.0**self.precision
            scores = torch.round(scores * scale) / scale
        scores = scores.contiguous()
        low = torch.gather(self.p0, 1, torch.searchsorted(self.grid, scores, right=True))
        high = torch.gather(self.p1, 1, torch.searchsorted(self.grid, scores, right=False))
        merged = high / (1.0 - low + high)
        if merged.shape[0] == 1:
            return answer_dtype(torch.stack([1.0 - merged[0], merged[0]], dim=1), logits)
        merged = merged.T
        return answer_dtype(merged / merged.sum(dim=1, keepdim=True), logits)
