"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.bodies import NumpyJSONResponse
from service.api.observability import render_metrics
from service.api.problems import problem
from service.errors import StoreUnavailable

router = APIRouter(tags=["health"])

_ALIVE = b'{"status":"ok"}'


@router.get("/healthz", summary="Liveness: the process answers", response_class=Response)
async def healthz() -> Response:
    return Response(_ALIVE, media_type="application/json")


@router.get(
    "/readyz",
    summary="Readiness: models and store loaded",
    responses={503: {"description": "still loading its models and store"}},
)
async def readyz(request: Request) -> Response:
    """200 once loaded. A store that cannot be written (read-only volume, disk full) is reported under
    ``store`` but keeps the service ready: calibrate and predict still serve the active calibrators, and an
    orchestrator that took every replica out of rotation for it would turn a failing write into an outage."""
    state = request.app.state.calibserve
    if not state.ready:
        return problem(503, "the service is still loading its models and store", kind="not-ready")
    try:
        await run_in_threadpool(state.store.check_writable)  # it fsyncs: never on the event loop
        store = {"writable": True, "detail": None}
    except StoreUnavailable as exc:
        store = {"writable": False, "detail": str(exc)}
    failing = state.registry.failing()
    return NumpyJSONResponse(
        {
            "status": "ready",
            "models": sorted(state.registry.names()),
            "failing_models": failing,
            "store": store,
        }
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
