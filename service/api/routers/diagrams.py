"""v1 codec for reliability diagrams, as SVG (what the console shows): of an evaluation, and of a calibrator
version's fit data (the bins the version stores)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.auth import ReadAccess
from service.api.bodies import cancelled_on_disconnect, json_body
from service.api.deps import ModelName, PinnedVersion, Plane, Version
from service.api.labelled import labelled_bodies, read_labelled
from service.api.schemas import EvaluateRequest, labelled
from service.serving.concurrency import in_thread
from service.serving.dataplane import LABELLED_KINDS
from service.serving.diagrams import SVG_TYPE, reliability_svg

router = APIRouter(prefix="/v1/models/{name}", tags=["inference"], dependencies=ReadAccess)


@router.post(
    "/evaluate/diagram",
    summary="The reliability diagram of an evaluation, before and after calibration, as SVG",
    description="The body is that of `/evaluate`; the answer is the figure `calibserve evaluate --plot x.svg` "
    "draws of its report (accuracy against confidence per bin, samples per bin, each curve's ECE).",
    response_class=Response,
    responses={200: {"content": {SVG_TYPE: {"schema": {"type": "string"}}}, "description": "the diagram"}},
    openapi_extra=json_body(EvaluateRequest, other_content=labelled_bodies(EvaluateRequest)),
)
async def reliability_diagram(
    name: ModelName, request: Request, plane: Plane, version: PinnedVersion = None
) -> Response:
    body = await read_labelled(request, EvaluateRequest, route_parameters=("version",))
    spec = body.spec()
    data = labelled(body, LABELLED_KINDS)
    async with cancelled_on_disconnect(request, plane.budget()) as budget:
        report = await plane.evaluate(name, version, data, spec, budget)
    image = await in_thread(reliability_svg, report)
    return Response(image, media_type=SVG_TYPE, headers={"Cache-Control": "no-store"})


@router.get(
    "/calibrators/{version}/diagram",
    summary="A calibrator version's reliability diagram on its fit data, before and after calibration, as SVG",
    description="Drawn from the bins the version stores of its fit data (`fit.reliability`), by the function "
    "that draws `calibserve evaluate --plot x.svg`; no data is sent. 404 (problem+json) where the version does "
    "not exist or stores no bins (fitted before they were stored, or uploaded without them): "
    "`POST /evaluate/diagram` draws one on labelled data.",
    response_class=Response,
    responses={
        200: {"content": {SVG_TYPE: {"schema": {"type": "string"}}}, "description": "the diagram"},
        404: {"description": "no such version, or it stores no reliability bins"},
    },
)
async def stored_reliability_diagram(name: ModelName, version: Version, plane: Plane) -> Response:
    report = await in_thread(plane.stored_reliability, name, version)
    image = await in_thread(reliability_svg, report, f"Version {version} on its fit data")
    return Response(image, media_type=SVG_TYPE, headers={"Cache-Control": "no-store"})
