"""Running the app under uvicorn: one or several workers sharing one store."""

from __future__ import annotations

import os
import tempfile

from fastapi import FastAPI

from service.config import Settings, get_settings


def app_factory() -> FastAPI:
    """The uvicorn factory each worker calls: settings come from the ``CALIBSERVE_*`` environment."""
    from service.api.app import create_app

    return create_app(get_settings())


def settings_environment(settings: Settings) -> dict[str, str]:
    """The settings as ``CALIBSERVE_*`` variables, so worker processes build the same ``Settings``."""
    env = {}
    for key, value in settings.model_dump().items():
        if value is not None:
            env[f"CALIBSERVE_{key.upper()}"] = str(value)
    return env


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; refuses a non-local bind without keys (``check_bind_is_safe``)."""
    import uvicorn

    settings.check_bind_is_safe()
    os.environ.update(settings_environment(settings))
    get_settings.cache_clear()
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="calibserve-metrics-")
    uvicorn.run(
        "service.api.server:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
