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
from starlette.responses import Response

from service.api.auth import ReadAccess
from service.api.deps import ModelName, PinnedVersion, Plane
from service.api.tensors import VERSION_HEADER

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
    plane: Plane,
    format: Annotated[str, Query(description="the file format: torchscript")] = "torchscript",
    version: PinnedVersion = None,
) -> Response:
    data, used = await plane.export(name, version, format)
    filename = f"{name}-calibrated-v{used}.pt" if used is not None else f"{name}-uncalibrated.pt"
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            VERSION_HEADER: "none" if used is None else str(used),
        },
    )
