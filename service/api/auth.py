"""API keys and roles, for every HTTP route (and every protocol that presents a key the same way).

A key is presented as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. Roles: ``read`` (GET routes,
calibrate, predict, evaluate, figures, OIP inference and metadata) and ``admin`` (everything that writes).
With auth off (no keys configured on a local address, or ``CALIBSERVE_AUTH=off``) every request passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from service.config import Settings, role_of
from service.errors import PermissionDenied, Unauthenticated

ROLE_RANK = {"read": 1, "admin": 2}
KEY_HEADER = "x-api-key"

HeaderGetter = Callable[[str], "str | bytes | None"]


def _text(value: str | bytes | None) -> str | None:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def presented_key(header: HeaderGetter) -> str | None:
    """The API key of a request whose headers ``header(lower-case name)`` reads; None when none is sent."""
    key = _text(header(KEY_HEADER))
    if key:
        return key
    authorization = _text(header("authorization"))
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def authorize(settings: Settings, presented: str | None, required: str) -> str | None:
    """The role ``presented`` grants if it suffices for ``required`` (None: auth is off).

    Raises Unauthenticated for a missing or unknown key, PermissionDenied for a key whose role is too low.
    """
    if not settings.auth_enabled:
        return None
    if not presented:
        raise Unauthenticated("an API key is required (X-API-Key or Authorization: Bearer)")
    role = role_of(presented, settings.key_roles)
    if role is None:
        raise Unauthenticated("the API key is not valid")
    if ROLE_RANK[role] < ROLE_RANK[required]:
        raise PermissionDenied(f"this route needs the {required} role; the key has {role}")
    return role


# The two schemes only document the headers in the OpenAPI schema; :func:`presented_key` reads them.
_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (read or admin)")
_bearer_scheme = HTTPBearer(auto_error=False, description="the API key as a bearer token")


def _role_dependency(required: str):
    async def check(
        request: Request,
        _key: Annotated[str | None, Security(_key_scheme)] = None,
        _bearer: Annotated[object, Security(_bearer_scheme)] = None,
    ) -> str | None:
        return authorize(request.app.state.settings, presented_key(request.headers.get), required)

    check.__name__ = f"require_{required}"
    return check


ReadAccess = [Depends(_role_dependency("read"))]
AdminAccess = [Depends(_role_dependency("admin"))]
