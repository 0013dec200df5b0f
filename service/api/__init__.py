"""HTTP layer: the only package that imports FastAPI and maps domain errors to HTTP."""

from service.api.app import create_app

__all__ = ["create_app"]
