"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
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
    responses={503: {"description": "still loading, or the store is not writable"}},
)
async def readyz(request: Request) -> Response:
    state = request.app.state.calibserve
    if not state.ready:
        return problem(503, "the service is still loading its models and store", kind="not-ready")
    try:
        state.store.check_writable()
    except StoreUnavailable as exc:
        return problem(503, str(exc), kind="store-unavailable")
    failing = state.registry.failing()
    return NumpyJSONResponse(
        {"status": "ready", "models": sorted(state.registry.names()), "failing_models": failing}
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
