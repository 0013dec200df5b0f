"""Export: a fitted calibrator (after its model, for TorchScript models) as one self-contained TorchScript file.

The calibrators build their own torch modules (:meth:`service.core.calibrators.BaseCalibrator.torch_module`;
:func:`calibrator_module` gives the plain softmax for no calibrator); this module composes them with a model
and writes the file. Compiling and saving go through :func:`service.registry.script_module`,
:func:`~service.registry.save_module` and :func:`~service.registry.cpu_copy`, so that the registry stays the
one module that calls torch's jit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

import torch

from service.core.calibrators import calibrator_module
from service.registry import LoadedModel, cpu_copy, exported, save_module, script_module

__all__ = ["EXPORT_FORMATS", "EXPORT_METADATA_FILE", "calibrator_module", "export_torchscript"]

EXPORT_FORMATS = ("torchscript",)
EXPORT_METADATA_FILE = "calibserve.json"


class _ModelThenCalibrator(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, calibrator: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calibrator = calibrator

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.calibrator(self.model(inputs))


class _WithPredictionSets(torch.nn.Module):
    """The calibration module (``forward``: probabilities, unchanged) with the version's conformal sets as a
    second method: ``prediction_sets(inputs, u=None)`` -> ``(N, K)`` bool."""

    def __init__(self, module: torch.nn.Module, sets: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.sets = sets

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)

    @exported
    def prediction_sets(self, inputs: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045 (TorchScript)
        return self.sets(self.module(inputs), u)


def export_torchscript(
    calibrator: Any | None,
    *,
    model: LoadedModel | None = None,
    metadata: Mapping[str, Any] | None = None,
    conformal: Any = None,
) -> bytes:
    """A TorchScript file (bytes) applying ``calibrator``: after ``model``'s module when one is given.

    Without a model the module takes logits ``(N, C)``; with one it takes what the model takes
    (``(N, *input_shape)``, not the flattened form ``predict`` also accepts). It returns probabilities
    ``(N, K)``: float64 for float64 logits, float32 otherwise. The module runs on the CPU; move it with
    ``.to(device)`` after loading. ``metadata`` is stored in the file as ``calibserve.json`` (read it back
    by passing ``_extra_files={"calibserve.json": ""}`` to torch's TorchScript loader).

    A multi-label model's file (``metadata["task"] == "multilabel"``) answers K per-label probabilities
    ``(N, K)`` that need not sum to 1; without a calibrator, the sigmoid of each logit.
    ``conformal`` (the version's :class:`~service.core.conformal.ConformalThresholds`) adds a method
    ``prediction_sets(inputs, u=None)``: the ``(N, K)`` boolean sets of the probabilities ``forward`` answers
    (randomised ones with the uniforms ``u``, one a row, or ``torch.rand``'s).

    Raises InvalidInput for a method that cannot be exported, or a model that cannot be embedded.
    """
    if calibrator is None and (metadata or {}).get("task") == "multilabel":
        from service.core.calibrators.torch_modules import (
            SigmoidModule,
        )  # no calibrator: each label's sigmoid

        module: torch.nn.Module = SigmoidModule()
    else:
        module = calibrator_module(calibrator)
    if model is not None:
        module = _ModelThenCalibrator(cpu_copy(model.module), module)
    if conformal is not None:
        from service.core.conformal_torch import ConformalSetsModule

        n_classes = 2 if calibrator.num_classes_ in (1, 2) else calibrator.num_classes_
        module = _WithPredictionSets(module, ConformalSetsModule(conformal, n_classes))
    module.eval()
    scripted = script_module(module)
    extra = {EXPORT_METADATA_FILE: json.dumps(dict(metadata or {}), default=str)}
    return save_module(scripted, extra)
