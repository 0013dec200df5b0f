"""v1 codec for live monitoring: outcomes of logged predictions, rolling-window figures and drift, refits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.api.auth import AdminAccess, ReadAccess
from service.api.bodies import NumpyJSONResponse, array, cancelled_on_disconnect, json_body, read_json
from service.api.deps import JSONAnswer, ModelName, Plane
from service.api.schemas import OutcomesRequest, RefitRequest
from service.errors import InvalidInput
from service.serving.dataplane import RefitSpec

router = APIRouter(prefix="/v1/models/{name}", tags=["monitoring"], dependencies=JSONAnswer)


@router.post(
    "/outcomes",
    summary="Labels of logged predictions (by id), or labelled logits or probabilities",
    dependencies=AdminAccess,
    openapi_extra=json_body(
        OutcomesRequest,
        examples={
            "by id": {"prediction_ids": ["3f2a9c1d0b7e4a55.0", "3f2a9c1d0b7e4a55.1"], "labels": [2, 0]},
            "by logits": {"logits": [[2.0, 0.5, -1.0]], "labels": [0]},
        },
    ),
)
async def post_outcomes(name: ModelName, request: Request, plane: Plane) -> NumpyJSONResponse:
    """Each row's fate is in ``results`` (``counted``, ``repeat``: already counted, ``unknown``: an id never
    issued, expired or of another model, ``invalid``: a label out of range), with the counts of each."""
    body = await read_json(request, OutcomesRequest)
    given = [key for key in ("prediction_ids", "logits", "probabilities") if getattr(body, key) is not None]
    if len(given) != 1:
        raise InvalidInput(
            f"send exactly one of prediction_ids, logits, probabilities; got {len(given) or 'none'}",
            field="body",
        )
    if given[0] == "prediction_ids":
        if body.calibrator_version is not None:
            raise InvalidInput(
                "calibrator_version goes with logits or probabilities", field="calibrator_version"
            )
        answer = await plane.outcomes(name, body.labels, prediction_ids=body.prediction_ids)
    else:
        answer = await plane.outcomes(
            name,
            body.labels,
            kind=given[0],
            scores=array(getattr(body, given[0]), given[0]),
            calibrator_version=body.calibrator_version,
        )
    return NumpyJSONResponse(answer)


@router.get(
    "/monitoring",
    summary="Calibration of the labelled outcomes of a rolling window, label-free estimates, drift state",
    dependencies=ReadAccess,
)
async def get_monitoring(
    name: ModelName,
    plane: Plane,
    window: Annotated[str, Query(max_length=16, description="15m, 1h, 24h, 7d, ...")] = "1h",
    calibrator_version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> NumpyJSONResponse:
    return NumpyJSONResponse(await plane.monitoring_report(name, window, calibrator_version))


@router.post(
    "/refit",
    summary="Fit a new version on a window's logged outcomes and compare it with the active one",
    dependencies=AdminAccess,
    status_code=201,
    openapi_extra=json_body(RefitRequest, examples={"day": {"window": "24h", "activate": "if_better"}}),
)
async def post_refit(name: ModelName, request: Request, plane: Plane) -> NumpyJSONResponse:
    body = await read_json(request, RefitRequest)
    spec = RefitSpec(
        window=body.window,
        method=body.method,
        options=body.options,
        holdout=body.holdout,
        activate=body.activate,
        seed=body.seed,
    )
    async with cancelled_on_disconnect(request, plane.budget()) as budget:
        answer = await plane.refit(name, spec, budget)
    return NumpyJSONResponse(answer, status_code=201)
