"""v1 codec for the calibrators of a model: fit, upload, list, read, activate, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.api.auth import AdminAccess, ReadAccess
from service.api.bodies import NumpyJSONResponse, cancelled_on_disconnect, json_body, read_object
from service.api.deps import JSONAnswer, ModelName, Plane, Version
from service.api.labelled import labelled_bodies, read_labelled
from service.api.schemas import FitRequest, labelled
from service.serving.concurrency import in_thread
from service.serving.dataplane import LABELLED_KINDS, FitSpec

router = APIRouter(prefix="/v1/models/{name}", tags=["calibrators"], dependencies=JSONAnswer)

_FIT_EXAMPLE = {
    "logits": [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.0, 3.1]],
    "labels": [0, 1, 2],
    "method": "temperature",
    "activate": True,
}


@router.post(
    "/fit",
    summary="Fit a calibrator on labelled logits, probabilities or inputs",
    dependencies=AdminAccess,
    status_code=201,
    responses={502: {"description": "the TorchScript model failed on the inputs"}},
    openapi_extra=json_body(
        FitRequest, examples={"temperature": _FIT_EXAMPLE}, other_content=labelled_bodies(FitRequest)
    ),
)
async def fit(name: ModelName, request: Request, plane: Plane) -> NumpyJSONResponse:
    body = await read_labelled(request, FitRequest)
    spec = FitSpec(
        method=body.method,
        options=body.options,
        activate=body.activate,
        conformal=body.conformal,
        conformal_fraction=body.conformal_fraction,
    )
    async with cancelled_on_disconnect(request, plane.budget()) as budget:
        stored = await plane.fit(name, labelled(body, LABELLED_KINDS), spec, budget)
    return NumpyJSONResponse(stored, status_code=201)


@router.post(
    "/calibrators",
    summary="Upload a calibrator document made elsewhere (e.g. by `calibserve fit`)",
    dependencies=AdminAccess,
    status_code=201,
)
async def upload_calibrator(name: ModelName, request: Request, plane: Plane, activate: bool = True):
    stored = await plane.upload_calibrator(name, await read_object(request), activate=activate)
    return NumpyJSONResponse(stored, status_code=201)


@router.get("/calibrators", summary="Calibrator versions, newest first", dependencies=ReadAccess)
async def list_calibrators(
    name: ModelName,
    plane: Plane,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> NumpyJSONResponse:
    # a thread: with the S3 store these are requests to the bucket
    page = await in_thread(plane.list_calibrators, name, limit=limit, cursor=cursor)
    return NumpyJSONResponse(page)


@router.get("/calibrators/{version}", summary="One calibrator version", dependencies=ReadAccess)
async def get_calibrator(name: ModelName, version: Version, plane: Plane) -> NumpyJSONResponse:
    return NumpyJSONResponse(await in_thread(plane.get_calibrator, name, version))


@router.post(
    "/calibrators/{version}/activate", summary="Make a version active (rollback)", dependencies=AdminAccess
)
async def activate(name: ModelName, version: Version, plane: Plane) -> NumpyJSONResponse:
    return NumpyJSONResponse(await plane.activate(name, version))


@router.delete(
    "/calibrators/{version}",
    summary="Delete a version (never the active one)",
    dependencies=AdminAccess,
    status_code=204,
    responses={409: {"description": "the version is the active one"}},
)
async def delete_calibrator(name: ModelName, version: Version, plane: Plane) -> Response:
    await plane.delete_calibrator(name, version)
    return Response(status_code=204)
