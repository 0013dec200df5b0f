"""Dependencies of the documented FastAPI routes: the data plane, path and query parameters.

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in the thread pool,
and those hops were most of a small request's cost.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Depends, Path, Query, Request
from pydantic import WithJsonSchema

from service.api.tensors import require_json_answer
from service.errors import InvalidParameter
from service.names import MAX_VERSION, parse_version, validate_model_name
from service.serving.dataplane import DataPlane


async def get_dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane


Plane = Annotated[DataPlane, Depends(get_dataplane)]


def single_values(query_string: bytes | str, names: frozenset[str] | None = None) -> None:
    """InvalidParameter when a query parameter is given twice: ``?cursor=a&cursor=b`` has no one meaning,
    and taking either silently would answer a question that was not asked. ``names`` limits the check."""
    if not query_string:
        return
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    seen: set[str] = set()
    for key, _ in parse_qsl(query_string, keep_blank_values=True):
        if key in seen and (names is None or key in names):
            raise InvalidParameter(f"query parameter {key!r} is given more than once", field=key)
        seen.add(key)


async def no_repeated_query(request: Request) -> None:
    single_values(request.scope.get("query_string", b""))


async def json_answer(request: Request) -> None:
    """406 unless the client accepts JSON: the routes that answer only JSON say so instead of ignoring it."""
    require_json_answer(request.headers.get("accept"))


JSONAnswer = [Depends(json_answer)]


async def model_name(name: str) -> str:
    """The ``{name}`` path parameter, checked before anything touches the disk."""
    return validate_model_name(name)


_VERSION_SCHEMA = WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_VERSION})


async def path_version(
    version: Annotated[str, _VERSION_SCHEMA, Path(description="a calibrator version")],
) -> int:
    return parse_version(version)  # type: ignore[return-value]  # a path segment is never None


async def pinned_version(
    version: Annotated[
        str | None, _VERSION_SCHEMA, Query(description="serve this calibrator version, not the active one")
    ] = None,
) -> int | None:
    return parse_version(version)


ModelName = Annotated[str, Depends(model_name)]
Version = Annotated[int, Depends(path_version)]
PinnedVersion = Annotated[int | None, Depends(pinned_version)]
