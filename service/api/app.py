"""The FastAPI application: ``create_app(settings)`` wires the state, the data plane, middleware, the one
exception handler, the protocol codecs (v1 routers, the Open Inference Protocol) and the OpenAPI document."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.api import docs, errors, openapi, ui
from service.api.browsers import EXPOSED_HEADERS, CrossOriginGuard, cors_origins
from service.api.deps import no_repeated_query
from service.api.limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from service.api.observability import MetricsMiddleware
from service.api.routers import (
    calibrators,
    diagrams,
    export,
    fallback,
    health,
    inference,
    models,
    monitoring,
    oip,
    scoring,
)
from service.config import Settings
from service.errors import StoreUnavailable
from service.registry import ModelRegistry
from service.serving.batching import DynamicBatcher
from service.serving.concurrency import in_thread
from service.serving.dataplane import DataPlane
from service.serving.state import AppState
from service.serving.telemetry import publish_active
from service.stores import open_store
from service.upstream import Upstreams

logger = logging.getLogger("calibserve")

DESCRIPTION = """
Post-hoc calibration for classifiers: fit temperature scaling (and vector, matrix, Platt, isotonic,
histogram binning) on labelled logits, serve calibrated probabilities, measure calibration.

Conventions: `ece` is top-label ECE with 15 equal-width bins, bin i = (i/15, (i+1)/15], L1 norm; `mce` is the
largest gap over non-empty bins; `brier` is the mean over samples of sum_k (p_k - 1[y=k])^2; `nll` is exact.
Errors are `application/problem+json` (RFC 9457); under `/v2` they are the protocol's `{"error": "..."}`.
"""


def create_app(settings: Settings) -> FastAPI:
    """Build the application for ``settings``; models and store load in the lifespan start-up."""
    state = AppState(
        settings=settings,
        store=open_store(
            settings.store_location,
            refresh_s=settings.store_refresh_s,
            cache_dir=settings.store_dir / "s3-cache",
        ),
        registry=ModelRegistry(settings.models_dir, device=settings.device, timeout=settings.model_timeout_s),
        upstreams=Upstreams(
            settings.upstream,
            connect_timeout=settings.upstream_connect_timeout_s,
            timeout=settings.upstream_timeout_s,
            max_connections=settings.upstream_max_connections,
            batch_size=settings.upstream_batch_size,
            share_calls=settings.upstream_share_calls,
        ),
    )
    if settings.batch_max_size > 0:
        state.batcher = DynamicBatcher(
            max_size=settings.batch_max_size, max_delay=settings.batch_max_delay_ms / 1000.0
        )
    plane = DataPlane(state)
    latency_models = frozenset(n.strip() for n in settings.metrics_model_latency.split(",") if n.strip())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await in_thread(state.start)
        try:
            names = state.all_model_names()
            for name in names:
                publish_active(name, state.active(name).document)
        except StoreUnavailable as exc:  # /readyz reports it; start serving what does not need the store
            logger.error("calibserve starts without its store: %s", exc)
            names = state.registry.names()
        plane.monitoring.start()
        grpc_server = None
        if settings.grpc_port is not None:  # grpcio and the stubs are imported only when asked for
            from service.api.grpc.server import start_grpc_server

            grpc_server = await start_grpc_server(plane, settings, latency_models=latency_models)
        logger.info("calibserve ready: %d models, store %s", len(names), settings.store_location)
        yield
        if grpc_server is not None:
            from service.api.grpc.server import stop_grpc_server

            await stop_grpc_server(grpc_server)
        await state.upstreams.aclose()
        await in_thread(plane.monitoring.close)
        state.store.close()

    app = FastAPI(
        title="calibserve",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=openapi.COMMON_RESPONSES,
        dependencies=[Depends(no_repeated_query)],
        docs_url=None,  # served from the package by docs.install, not from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.dataplane = plane
    errors.install(app)
    docs.install(app)
    ui.install(app)  # the operator's console: /ui
    # the hot paths, as plain ASGI routes, first: the router tries routes in order (a regex match each)
    app.router.routes[:0] = [*inference.ROUTES, *oip.ROUTES]
    routers = (
        health.router,
        models.router,
        calibrators.router,
        inference.router,
        monitoring.router,
        scoring.router,
        diagrams.router,
    )
    for router in routers:
        app.include_router(router)
    app.include_router(oip.router)
    app.include_router(export.router)
    app.include_router(fallback.router)  # last: only paths no other route matched
    openapi.install(app)
    app.add_middleware(MetricsMiddleware, latency_models=latency_models)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ConcurrencyLimitMiddleware, max_concurrency=settings.max_concurrency)
    origins = cors_origins(settings.cors_origins)
    app.add_middleware(CrossOriginGuard, allowed_origins=origins)
    if origins:  # outermost: preflights are answered, and refusals carry the CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
        )
    return app
