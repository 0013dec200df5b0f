"""Export: the model's calibration as one TorchScript file, to load into Triton, TorchServe or plain torch.

``GET /v1/models/{name}/export?format=torchscript[&version=N]`` answers ``application/octet-stream``:

- a TorchScript model: its module followed by the calibrator (input: what the model takes);
- a logits-only model: the calibrator alone (input: logits ``(N, K)``, one column for a binary model).

Output: probabilities ``(N, K)``, float64 for float64 input and float32 otherwise, equal to what
``/calibrate`` and ``/predict`` answer. Every calibration method exports (isotonic and histogram binning as
``torch.searchsorted`` over their stored knots and bins); without an active calibrator the module is the
plain softmax, as the service would answer. The calibrator version is in ``X-Calibrator-Version`` and,
with the calibrator document, in the file's ``calibserve.json`` extra file.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.deps import ModelName, ReadAccess, State
from service.api.routers.inference import PinnedVersion
from service.api.tensors import VERSION_HEADER
from service.errors import InvalidInput
from service.export import EXPORT_FORMATS, export_torchscript

router = APIRouter(prefix="/v1/models/{name}", tags=["export"], dependencies=ReadAccess)


@router.get(
    "/export",
    summary="The calibrated model (or the calibrator alone) as a TorchScript file",
    response_class=Response,
    responses={
        200: {
            "description": "a TorchScript file (load it with torch's jit loader) returning calibrated probabilities",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        502: {"description": "the TorchScript model failed to load"},
    },
)
async def export(
    name: ModelName,
    state: State,
    format: Annotated[str, Query(description="the file format: torchscript")] = "torchscript",
    version: PinnedVersion = None,
) -> Response:
    if format not in EXPORT_FORMATS:
        raise InvalidInput(
            f"export format {format!r} is not supported; use one of {', '.join(EXPORT_FORMATS)}",
            field="format",
        )
    info = state.model_info(name)
    model = None
    if info.get("kind") == "torchscript":
        state.sync_uploaded_model(name)
        model = state.registry.get(name)  # ModelFailed (502) for a model that failed to load
    entry = state.calibrator_for(name, version)
    metadata = {
        "model": name,
        "kind": info.get("kind"),
        "num_classes": info.get("num_classes"),
        "class_names": info.get("class_names"),
        "input": "inputs" if model is not None else "logits",
        "input_shape": list(model.input_shape) if model is not None and model.input_shape else None,
        "calibrator_version": entry.version,
        "calibrator": entry.document,
    }
    data = await run_in_threadpool(export_torchscript, entry.calibrator, model=model, metadata=metadata)
    filename = (
        f"{name}-calibrated-v{entry.version}.pt" if entry.version is not None else f"{name}-uncalibrated.pt"
    )
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            VERSION_HEADER: "none" if entry.version is None else str(entry.version),
        },
    )
