"""Dependencies of the routes: the worker's state and the role a request's API key grants.

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in the thread pool,
and those hops were most of a small request's cost (measured: 887 us -> 136 us for a 1 x 10 calibrate).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from service.api.state import AppState
from service.config import role_of
from service.store import validate_model_name

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (read or admin)")
bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")


async def get_state(request: Request) -> AppState:
    return request.app.state.calibserve


async def get_ready_state(request: Request) -> AppState:
    state: AppState = request.app.state.calibserve
    state.require_ready()
    return state


State = Annotated[AppState, Depends(get_ready_state)]


async def model_name(name: str) -> str:
    """The ``{name}`` path parameter, checked before anything touches the disk."""
    return validate_model_name(name)


ModelName = Annotated[str, Depends(model_name)]

ROLE_RANK = {"read": 1, "admin": 2}


def authorize(settings, presented: str | None, required: str) -> str | None:
    """The role ``presented`` grants if it suffices for ``required``; 401 / 403 otherwise (None: auth off)."""
    if not settings.auth_enabled:
        return None
    if not presented:
        raise HTTPException(
            401,
            "an API key is required (X-API-Key or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    role = role_of(presented, settings.key_roles)
    if role is None:
        raise HTTPException(401, "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    if ROLE_RANK[role] < ROLE_RANK[required]:
        raise HTTPException(403, f"this route needs the {required} role; the key has {role}")
    return role


def role_check(required: str):
    async def check(
        request: Request,
        key: Annotated[str | None, Security(api_key_header)] = None,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
    ) -> str | None:
        presented = key or (credentials.credentials if credentials else None)
        return authorize(request.app.state.calibserve.settings, presented, required)

    check.__name__ = f"require_{required}"
    return check


require_read = role_check("read")
require_admin = role_check("admin")
ReadAccess = [Depends(require_read)]
AdminAccess = [Depends(require_admin)]
