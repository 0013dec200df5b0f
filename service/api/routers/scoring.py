"""v1 codec for stateless figures: POST labelled logits or probabilities, get every calibration figure and
loss back."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.auth import ReadAccess
from service.api.bodies import NumpyJSONResponse, cancelled_on_disconnect, json_body
from service.api.deps import JSONAnswer, Plane
from service.api.labelled import labelled_bodies, read_labelled
from service.api.schemas import MetricsRequest, labelled

router = APIRouter(prefix="/v1", tags=["metrics"], dependencies=[*ReadAccess, *JSONAnswer])


@router.post(
    "/metrics",
    summary="ECE (and variants), MCE, Brier, NLL, accuracy, reliability bins and evaluation losses",
    openapi_extra=json_body(
        MetricsRequest,
        examples={"three rows": {"probabilities": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], "labels": [0, 1, 1]}},
        other_content=labelled_bodies(MetricsRequest),
    ),
)
async def figures(request: Request, plane: Plane) -> NumpyJSONResponse:
    body = await read_labelled(request, MetricsRequest)
    spec = body.spec()
    data = labelled(body, ("logits", "probabilities"))
    async with cancelled_on_disconnect(request, plane.budget()) as budget:
        answer = await plane.figures(data, spec, with_losses=body.losses, budget=budget, task=body.task)
    return NumpyJSONResponse(answer)
