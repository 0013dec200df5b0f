"""The FastAPI application: ``create_app(settings)`` wires state, middleware, error mapping and routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api import problems
from service.api.batching import DynamicBatcher
from service.api.limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from service.api.observability import MetricsMiddleware
from service.api.routers import calibrators, export, fallback, health, inference, models, oip, scoring
from service.api.state import AppState
from service.config import Settings
from service.registry import ModelRegistry
from service.store import CalibratorStore

logger = logging.getLogger("calibserve")

DESCRIPTION = """
Post-hoc calibration for classifiers: fit temperature scaling (and vector, matrix, Platt, isotonic,
histogram binning) on labelled logits, serve calibrated probabilities, measure calibration.

Conventions: `ece` is top-label ECE with 15 equal-width bins, bin i = (i/15, (i+1)/15], L1 norm; `mce` is the
largest gap over non-empty bins; `brier` is the mean over samples of sum_k (p_k - 1[y=k])^2; `nll` is exact.
Errors are `application/problem+json` (RFC 9457).
"""


def create_app(settings: Settings) -> FastAPI:
    """Build the application for ``settings``; models and store load in the lifespan start-up."""
    state = AppState(
        settings=settings,
        store=CalibratorStore(settings.store_dir),
        registry=ModelRegistry(settings.models_dir, device=settings.device),
    )
    if settings.batch_max_size > 0:
        state.batcher = DynamicBatcher(
            max_size=settings.batch_max_size, max_delay=settings.batch_max_delay_ms / 1000.0
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(state.start)
        for name in state.all_model_names():
            calibrators.publish_temperature(name, state.active(name).document)
        logger.info("calibserve ready: %d models, store %s", len(state.all_model_names()), settings.store_dir)
        yield

    app = FastAPI(
        title="calibserve",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={
            400: {"description": "bad input (problem+json)"},
            401: {"description": "missing or unknown API key"},
            403: {"description": "API key lacks the role"},
            413: {"description": "body over CALIBSERVE_MAX_BODY_BYTES"},
            503: {"description": "not ready, store not writable, or overloaded"},
        },
    )
    app.state.calibserve = state
    problems.install(app)
    for router in (health.router, models.router, calibrators.router, inference.router, scoring.router):
        app.include_router(router)
    app.include_router(oip.router)
    app.include_router(export.router)
    for hot in (oip, inference):  # the hot paths, in front of their documented routes
        hot.install_lean_routes(app)
    app.include_router(fallback.router)  # last: only paths no other route matched
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ConcurrencyLimitMiddleware, max_concurrency=settings.max_concurrency)
    return app
