"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.bodies import NumpyJSONResponse
from service.api.deps import Plane
from service.serving.concurrency import in_thread
from service.serving.telemetry import render_metrics

router = APIRouter(tags=["health"])

_ALIVE = b'{"status":"ok"}'


@router.get("/healthz", summary="Liveness: the process answers", response_class=Response)
async def healthz(request: Request) -> Response:
    """``{"status": "ok"}`` while the process answers. A model whose forward pass ran past the time limit
    keeps one of its own threads until that pass returns (a thread cannot be killed): the answer stays 200
    (the worker serves everything else) but says ``"degraded"`` and names the stalled models, so that an
    operator can tell, and restart the process to reclaim those threads."""
    stalled = request.app.state.dataplane.stalled_models()
    if not stalled:
        return Response(_ALIVE, media_type="application/json")
    body = {"status": "degraded", "stalled_models": stalled}
    return Response(orjson.dumps(body), media_type="application/json")


# HEAD answers as GET does (headers only); probes and load balancers use it. Not a separate operation.
router.head("/healthz", include_in_schema=False, response_class=Response)(healthz)


@router.get(
    "/readyz",
    summary="Readiness: models and store loaded",
    responses={503: {"description": "still loading its models and store"}},
)
async def readyz(plane: Plane) -> Response:
    """200 once loaded. A store that cannot be written (read-only volume, disk full) is reported under
    ``store`` but keeps the service ready: calibrate and predict still serve the active calibrators, and an
    orchestrator that took every replica out of rotation for it would turn a failing write into an outage."""
    return NumpyJSONResponse(await plane.readiness())


router.head("/readyz", include_in_schema=False)(readyz)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(plane: Plane) -> Response:
    """The process's series (every worker's in multiprocess mode) and the monitoring gauges, which are read
    from the shared monitoring database (so in a thread: never on the event loop)."""
    body, content_type = await in_thread(render_metrics, *plane.metrics_collectors())
    return Response(body, media_type=content_type)
