"""The torch twin of :func:`service.core.conformal.prediction_sets`, for TorchScript export.

Imported only when a calibrator version with conformal sets is exported (:mod:`service.export`), so that
fitting and serving never import torch through it. The same scores, thresholds, rule and tolerance as the
numpy sets, in float64: the exported file answers the sets the service answers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from service.core.conformal import SCORES, TOLERANCE, ConformalThresholds


class ConformalSetsModule(torch.nn.Module):
    """Probabilities ``(N, K)`` (and, for randomised sets, optional uniforms ``u`` ``(N,)``; drawn with
    ``torch.rand`` when absent) to the ``(N, K)`` boolean prediction sets."""

    def __init__(self, fitted: ConformalThresholds, n_classes: int) -> None:
        super().__init__()
        spec = fitted.spec
        self.register_buffer(
            "thresholds", torch.as_tensor(np.asarray(fitted.per_class(n_classes), np.float64))
        )
        self.score = SCORES.index(spec.score)  # 0 lac, 1 aps, 2 raps
        self.randomized = bool(spec.randomized)
        self.k_reg = int(spec.k_reg or 0)
        self.lam = float(spec.lam or 0.0) if spec.score == "raps" else 0.0
        self.tolerance = TOLERANCE

    def forward(self, probabilities: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045 (TorchScript)
        p = probabilities.to(torch.float64)
        q = self.thresholds.unsqueeze(0)
        if self.score == 0:
            return (1.0 - p) - q <= self.tolerance
        n, k = p.shape[0], p.shape[1]
        order = torch.argsort(p, dim=1, descending=True, stable=True)
        positions = torch.arange(1, k + 1, dtype=torch.int64, device=p.device).unsqueeze(0).expand(n, k)
        ranks = torch.empty_like(order).scatter_(1, order, positions)
        cumulative = torch.cumsum(torch.gather(p, 1, order), dim=1)
        through = torch.gather(cumulative, 1, ranks - 1)
        if self.lam != 0.0:
            through = through + self.lam * torch.clamp(ranks - self.k_reg, min=0).to(torch.float64)
        if self.randomized:
            draws = torch.rand(n, dtype=torch.float64, device=p.device) if u is None else u.to(torch.float64)
            return (through - draws.unsqueeze(1) * p) - q <= self.tolerance
        before = through - p
        if self.lam != 0.0:
            before = before - self.lam * (ranks > self.k_reg).to(torch.float64)
        return (ranks == 1) | (before - q < -self.tolerance)
