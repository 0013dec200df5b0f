"""v1 codec for reliability diagrams: the diagram of an evaluation, as SVG (what the console shows)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.auth import ReadAccess
from service.api.bodies import cancelled_on_disconnect, json_body
from service.api.deps import ModelName, PinnedVersion, Plane
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
