"""Calibrators of a model: fit, upload, list, read, activate, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import workflows
from service.api.bodies import NumpyJSONResponse, json_body, read_json, read_object
from service.api.deps import AdminAccess, ModelName, ReadAccess, State
from service.api.observability import ACTIVE_TEMPERATURE, FITS
from service.api.routers.common import model_logits, one_of
from service.api.schemas import FitRequest
from service.errors import InvalidInput

router = APIRouter(prefix="/v1/models/{name}", tags=["calibrators"])

Version = Annotated[int, Path(ge=1, le=2**31 - 1)]

_FIT_EXAMPLE = {
    "logits": [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.0, 3.1]],
    "labels": [0, 1, 2],
    "method": "temperature",
    "activate": True,
}


def publish_temperature(name: str, document: dict[str, Any] | None) -> None:
    if document is not None and document.get("method") == "temperature":
        ACTIVE_TEMPERATURE.labels(name).set(float(document["temperature"]))


@router.post(
    "/fit",
    summary="Fit a calibrator on labelled logits, probabilities or inputs",
    dependencies=AdminAccess,
    status_code=201,
    responses={502: {"description": "the TorchScript model failed on the inputs"}},
    openapi_extra=json_body(FitRequest, examples={"temperature": _FIT_EXAMPLE}),
)
async def fit(name: ModelName, request: Request, state: State) -> NumpyJSONResponse:
    body = await read_json(request, FitRequest)
    info = state.model_info(name)
    kind, values = one_of(body, ("logits", "probabilities", "inputs"))
    scores, from_logits = await model_logits(state, name, kind, values)
    document = await run_in_threadpool(
        workflows.fit_document,
        scores,
        body.labels,
        from_logits=from_logits,
        method=body.method,
        options=body.options,
        model=name,
        num_classes=info.get("num_classes"),
        sample_weight=body.sample_weight,
    )
    await run_in_threadpool(state.ensure_record, name, info)
    stored = await run_in_threadpool(state.store.add_calibrator, name, document, activate=body.activate)
    FITS.labels(name, body.method).inc()
    if body.activate:
        publish_temperature(name, stored)
    return NumpyJSONResponse(stored, status_code=201)


@router.post(
    "/calibrators",
    summary="Upload a calibrator document made elsewhere (e.g. by `calibserve fit`)",
    dependencies=AdminAccess,
    status_code=201,
)
async def upload_calibrator(
    name: ModelName, request: Request, state: State, activate: bool = True
) -> NumpyJSONResponse:
    document = await read_object(request)
    calibrator = workflows.load_calibrator(document)  # refuses malformed documents before anything is written
    info = state.model_info(name)
    expected = info.get("num_classes")
    if expected is not None and document.get("num_classes") not in (None, expected):
        raise InvalidInput(
            f"the calibrator was fitted for {document.get('num_classes')} classes; model {name!r} has {expected}",
            field="num_classes",
        )
    document = {**document, **calibrator.to_dict(), "format_version": workflows.FORMAT_VERSION}
    await run_in_threadpool(state.ensure_record, name, info)
    stored = await run_in_threadpool(state.store.add_calibrator, name, document, activate=activate)
    if activate:
        publish_temperature(name, stored)
    return NumpyJSONResponse(stored, status_code=201)


@router.get("/calibrators", summary="Calibrator versions, newest first", dependencies=ReadAccess)
async def list_calibrators(
    name: ModelName,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> NumpyJSONResponse:
    state.model_info(name)
    items, next_cursor = state.store.list_calibrators(name, limit=limit, cursor=cursor)
    return NumpyJSONResponse(
        {"items": items, "next_cursor": next_cursor, "active_version": state.store.active_version(name)}
    )


@router.get("/calibrators/{version}", summary="One calibrator version", dependencies=ReadAccess)
async def get_calibrator(name: ModelName, version: Version, state: State) -> NumpyJSONResponse:
    return NumpyJSONResponse(state.store.get_calibrator(name, version))


@router.post(
    "/calibrators/{version}/activate", summary="Make a version active (rollback)", dependencies=AdminAccess
)
async def activate(name: ModelName, version: Version, state: State) -> NumpyJSONResponse:
    await run_in_threadpool(state.store.activate, name, version)
    document = state.store.get_calibrator(name, version)
    publish_temperature(name, document)
    return NumpyJSONResponse(document)


@router.delete(
    "/calibrators/{version}",
    summary="Delete a version (never the active one)",
    dependencies=AdminAccess,
    status_code=204,
    responses={409: {"description": "the version is the active one"}},
)
async def delete_calibrator(name: ModelName, version: Version, state: State) -> Response:
    await run_in_threadpool(state.store.delete_calibrator, name, version)
    state.forget(name)
    return Response(status_code=204)
