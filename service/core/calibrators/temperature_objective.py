"""Passes over the logits for temperature scaling: NLL and its derivatives in ``beta = 1 / T``, focal, Brier.

Torch does the passes (threaded, in-place on reused block buffers); this module is imported by
:class:`~service.core.calibrators.temperature.TemperatureScaling` only when it fits, or transforms a batch
large enough for torch's softmax.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

# Elements (rows x columns) per block when a pass over the logits is done in float64: small enough to stay in
# cache, which made blocked float64 torch passes faster than one float32 pass over the whole array (measured:
# 1M x 10 in 42 ms, 50k x 1000 in 127 ms per evaluation of NLL and its two derivatives).
BLOCK_ELEMENTS = 1 << 18
# Rows of at most this many columns are summed by a matrix-vector product in the temperature fit's passes.
MATVEC_SUM_COLUMNS = 32


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of ``array``, copied only when torch cannot share it (read-only, strided, byte-swapped).

    Nothing here writes into the view: every in-place operation works on a float64 copy of a block.
    """
    return torch.from_numpy(np.require(array, array.dtype.newbyteorder("="), ["C", "W"]))


def row_blocks(n_rows: int, n_columns: int) -> Iterator[slice]:
    rows = max(1, BLOCK_ELEMENTS // max(n_columns, 1))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


class SinglePrecisionOverflow(ArithmeticError):
    """The float32 stage of a temperature fit met values beyond float32's range."""


class TemperatureObjective:
    """Objectives of the inverse temperature ``beta = 1 / T`` over fixed logits, in float64.

    The logits stay as given (float32 is not copied to float64 as a whole); each pass converts one cache-sized
    block to float64, so sums and the exponentials are float64 while memory stays at the input's size.
    """

    def __init__(self, z: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> None:
        self.logits = as_tensor(z)
        self.labels = as_tensor(y)
        self.n_samples, self.n_columns = z.shape
        # amax, not max: no indices needed, and max(dim=1) was 2.4x slower on short rows (1M x 10: 29 ms)
        self._row_max_as_given = self.logits.amax(dim=1)
        self.row_max = self._row_max_as_given.to(torch.float64)
        # Shifted true-class logit z_y - max_k z_k (<= 0): the softmax is evaluated on z - max z.
        true_logit = self.logits.gather(1, self.labels[:, None])[:, 0].to(torch.float64)
        self.true_shifted = true_logit - self.row_max
        self.weights = None if weights is None else as_tensor(weights)
        self.total_weight = float(self.n_samples) if weights is None else float(weights.sum())
        self.evaluations = 0
        self._workspaces: dict[
            torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}

    def _workspace(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block buffers reused by every pass: ``(shifted, exponentials, three row sums, ones)``.

        A fresh block-sized tensor per step costs page faults on every pass (1M x 10: the float64 pass took
        96 ms with them, 82 ms without).
        """
        if dtype not in self._workspaces:
            rows = min(self.n_samples, max(1, BLOCK_ELEMENTS // max(self.n_columns, 1)))
            block = (rows, self.n_columns)
            self._workspaces[dtype] = (
                torch.empty(block, dtype=dtype),
                torch.empty(block, dtype=dtype),
                torch.empty((3, rows), dtype=dtype),
                torch.ones(self.n_columns, dtype=dtype),
            )
        return self._workspaces[dtype]

    def _row_sums(self, values: torch.Tensor, out: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        # On short rows a matrix-vector product with ones beats sum(dim=1) (1M x 10: 12 ms less per pass, in
        # float32 and float64 alike); on long rows they are even.
        if self.n_columns > MATVEC_SUM_COLUMNS:
            return torch.sum(values, dim=1, out=out)
        return torch.mv(values, ones, out=out)

    def _derivative_sums(
        self,
        shifted: torch.Tensor,
        beta: float | torch.Tensor,
        exponentials: torch.Tensor,
        sums: torch.Tensor,
        ones: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of a block ``s = z - max z``: ``log sum_k e^{beta s_k}``, ``E_p[s]`` and ``Var_p[s]``."""
        n_rows = shifted.shape[0]
        e = torch.mul(shifted, beta, out=exponentials).exp_()
        norm = self._row_sums(e, sums[0, :n_rows], ones)
        first = self._row_sums(e.mul_(shifted), sums[1, :n_rows], ones).div_(norm)
        second = self._row_sums(e.mul_(shifted), sums[2, :n_rows], ones).div_(norm)
        second.addcmul_(first, first, value=-1.0).clamp_(min=0.0)
        return norm.log_(), first, second

    def _weighted_sum(self, values: torch.Tensor, rows: slice | None = None) -> float:
        if self.weights is None:
            return float(values.sum())
        weights = self.weights if rows is None else self.weights[rows]
        return float(torch.dot(weights, values))

    def nll(self, beta: float) -> tuple[float, float, float]:
        """Weighted mean NLL of ``softmax(beta * z)`` and its first and second derivatives in ``beta``.

        With ``s = beta * z`` and ``p = softmax(s)``: ``NLL = mean(logsumexp(s) - s_y)``,
        ``dNLL/dbeta = mean(E_p[z] - z_y)`` and ``d2NLL/dbeta2 = mean(Var_p[z]) >= 0`` (so NLL is convex
        in ``beta``). Rows are shifted by their max first, which changes none of the three.
        """
        self.evaluations += 1
        log_norm = mean_z = variance = 0.0
        shifted_buffer, exponentials, sums, ones = self._workspace(torch.float64)
        for rows in row_blocks(self.n_samples, self.n_columns):
            shifted = shifted_buffer[: rows.stop - rows.start]
            shifted.copy_(self.logits[rows])  # float32 -> float64: z - max z below is then exact
            shifted.sub_(self.row_max[rows, None])
            logs, first, second = self._derivative_sums(
                shifted, beta, exponentials[: shifted.shape[0]], sums, ones
            )
            log_norm += self._weighted_sum(logs, rows)
            mean_z += self._weighted_sum(first, rows)
            variance += self._weighted_sum(second, rows)
        true_sum = self._weighted_sum(self.true_shifted)
        total = self.total_weight
        return (log_norm - beta * true_sum) / total, (mean_z - true_sum) / total, variance / total

    def nll_single(self, beta: float) -> tuple[float, float, float]:
        """:meth:`nll` with float32 exponentials and row sums (sums over rows in float64): a Newton stage.

        About 1e-7 relative accuracy: enough to steer Newton's first steps towards the optimum, which the
        float64 :meth:`nll` then makes exact in one or two steps. Measured per pass, same run, 1M x 10: 52 ms
        in float64, 34 ms here; 50k x 1000: 247 ms and 132 ms. Raises :class:`SinglePrecisionOverflow` where
        the logits are too spread for float32 (squares of ``z - max z`` beyond its range).
        """
        self.evaluations += 1
        log_norm = mean_z = variance = 0.0
        beta32 = torch.tensor(beta, dtype=torch.float32)
        shifted_buffer, exponentials, sums, ones = self._workspace(torch.float32)
        for rows in row_blocks(self.n_samples, self.n_columns):
            shifted = shifted_buffer[: rows.stop - rows.start]
            if self.logits.dtype == torch.float32:
                torch.sub(self.logits[rows], self._row_max_as_given[rows, None], out=shifted)
            else:
                shifted.copy_(self.logits[rows].sub(self._row_max_as_given[rows, None]))
            logs, first, second = self._derivative_sums(
                shifted, beta32, exponentials[: shifted.shape[0]], sums, ones
            )
            log_norm += self._weighted_sum(logs.to(torch.float64), rows)
            mean_z += self._weighted_sum(first.to(torch.float64), rows)
            variance += self._weighted_sum(second.to(torch.float64), rows)
        if not math.isfinite(log_norm + mean_z + variance):
            raise SinglePrecisionOverflow
        true_sum = self._weighted_sum(self.true_shifted)
        total = self.total_weight
        return (log_norm - beta * true_sum) / total, (mean_z - true_sum) / total, variance / total

    def focal(self, beta: float, gamma: float) -> float:
        """Weighted mean focal loss ``-(1 - p_y)^gamma log p_y`` of ``softmax(beta * z)``."""
        self.evaluations += 1
        total = 0.0
        for rows in row_blocks(self.n_samples, self.n_columns):
            scaled = self.logits[rows].to(torch.float64, copy=True).mul_(beta)
            log_p_true = torch.log_softmax(scaled, dim=1).gather(1, self.labels[rows, None])[:, 0]
            # 1 - p_y as -expm1(log p_y): exact when p_y is close to 1, where (1 - p_y)^gamma matters most.
            loss = torch.special.expm1(log_p_true).neg_().clamp_(min=0.0).pow_(gamma).mul_(log_p_true).neg_()
            total += self._weighted_sum(loss, rows)
        return total / self.total_weight

    def brier(self, beta: float) -> float:
        """Weighted mean multiclass Brier score ``sum_k (p_k - 1[y = k])^2`` of ``softmax(beta * z)``."""
        self.evaluations += 1
        total = 0.0
        for rows in row_blocks(self.n_samples, self.n_columns):
            p = torch.softmax(self.logits[rows].to(torch.float64, copy=True).mul_(beta), dim=1)
            p_true = p.gather(1, self.labels[rows, None])[:, 0]
            loss = p.square().sum(dim=1).sub_(p_true.mul(2.0)).add_(1.0)
            total += self._weighted_sum(loss, rows)
        return total / self.total_weight
