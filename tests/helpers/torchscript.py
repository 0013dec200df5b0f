"""TorchScript modules for tests, good and faulty, and their serialised bytes.

The faulty ones pass the registry's smoke check (one row) and fail on batches of two rows or more, so that
they can be uploaded and then fail at inference. TorchScript reads no module globals: numbers are spelt out.
"""

from __future__ import annotations

import io

import torch


def scripted(module: torch.nn.Module) -> bytes:
    """``module`` compiled with ``torch.jit.script`` and saved: the bytes of a ``model.pt``."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


class Linear(torch.nn.Module):
    """A good model: 4 features -> 3 logits (or ``n_out``), weights drawn from ``seed``."""

    def __init__(self, seed: int = 0, n_features: int = 4, n_out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(n_features, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Raises(torch.nn.Module):
    """3 zero logits for one row; raises (the model's own bug) for more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError("the model's own bug")
        return torch.zeros(x.shape[0], 3)


class WrongShape(torch.nn.Module):
    """3 columns for one row, 5 for more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 3 if x.shape[0] == 1 else 5)


class ReturnsNaN(torch.nn.Module):
    """Zeros for one row; a NaN in the second row of a larger batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3)
        if x.shape[0] > 1:
            out[1, 2] = float("nan")
        return out
