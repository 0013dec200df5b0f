"""Request and response bodies: orjson straight into numpy, without per-float pydantic validation.

Routes take the raw request, parse it with orjson, and check the small fields with a pydantic model whose
array fields are typed ``Any`` (the core's validation checks arrays as a whole, with row numbers). The
OpenAPI document still shows each body's schema through ``json_body(Model)``.

The hot paths (calibrate, predict, OIP infer) go further: each is one :class:`LeanRoute`, a plain ASGI
handler at the Starlette router level, without FastAPI's dependency injection (whose per-request work was
most of a small request's cost); its OpenAPI operation is written in :mod:`service.api.openapi`. Auth,
limits, metrics and the error format are the same as everywhere else: the middleware wraps these routes
too, auth calls the same role check, and the errors raised here reach the one exception handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import numpy as np
import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.routing import Match, Route

from service.api import auth, tensors
from service.api.deps import single_values
from service.core.cancellation import Budget
from service.errors import InvalidInput, InvalidParameter

ModelT = TypeVar("ModelT", bound=BaseModel)


class NumpyJSONResponse(Response):
    """JSON answer rendered by orjson, numpy arrays included."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def json_body(
    model: type[BaseModel],
    *,
    examples: dict[str, Any] | None = None,
    other_content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON request body that the route parses itself.

    ``other_content`` adds further media types (binary tensors) to the same request body.
    """
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    media: dict[str, Any] = {"schema": schema}
    if examples:
        media["examples"] = {key: {"value": value} for key, value in examples.items()}
    content = {"application/json": media, **(other_content or {})}
    return {"requestBody": {"required": True, "content": content}}


def parse_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object (orjson); 400 naming the problem otherwise."""
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object", field="body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object", field="body")
    return data


def validate_object(data: dict[str, Any], model: type[ModelT]) -> ModelT:
    """``model.model_validate(data)``; field problems raise InvalidParameter naming every field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {
                "field": ".".join(str(part) for part in error.get("loc", ())) or "body",
                "message": error.get("msg", "invalid"),
            }
            for error in exc.errors(include_url=False, include_input=False)
        ]
        first = details[0] if details else {"field": "body", "message": "invalid"}
        raise InvalidParameter(
            f"{first['field']}: {first['message']}", field=first["field"], details=details
        ) from None


@asynccontextmanager
async def cancelled_on_disconnect(request: Request, budget: Budget) -> AsyncIterator[Budget]:
    """Cancel ``budget`` when the client goes away while the ``with`` body computes its answer.

    Call it once the body is read: the server's next receive message is then the disconnect, or nothing.
    """

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                budget.cancel("the client disconnected")
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield budget
    finally:
        watcher.cancel()


async def read_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (orjson); 415 for another Content-Type, 400 for a bad body."""
    tensors.body_type(request.headers.get("content-type"), (tensors.JSON,))
    return parse_object(await request.body())


async def read_json(request: Request, model: type[ModelT]) -> ModelT:
    return validate_object(await read_object(request), model)


def array(values: Any, name: str) -> np.ndarray:
    """A JSON array as numpy; ragged or non-numeric arrays are refused by the core's validation later."""
    if values is None:
        raise InvalidInput(f"{name} is required", field=name)
    try:
        return np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidInput(f"{name} must be a rectangular array of numbers", field=name) from None


# ------------------------------------------------------------------------------------------ lean routes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
LeanHandler = Callable[["LeanRequest"], Awaitable[Response]]


class LeanRequest:
    """What a lean handler reads: path parameters, headers (lower-case names), query and the body."""

    __slots__ = ("_headers", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self._headers: dict[bytes, bytes] | None = None

    @property
    def path_params(self) -> dict[str, Any]:
        return self.scope["path_params"]

    def header(self, name: str) -> bytes | None:
        """The value of header ``name`` (lower-case); repeated headers keep the last one."""
        if self._headers is None:
            self._headers = dict(self.scope["headers"])
        return self._headers.get(name.encode("latin-1"))

    def query(self, name: str) -> str | None:
        """The value of query parameter ``name``, decoded; None when absent (the route has already refused
        repeated parameters)."""
        raw: bytes = self.scope.get("query_string", b"")
        if not raw:
            return None
        for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
            if key == name:
                return value
        return None

    async def body(self) -> bytes:
        """The whole request body (the body-size middleware upstream bounds it)."""
        chunks = []
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def authorize(request: LeanRequest, role: str) -> None:
    """The role check of the documented routes' dependencies, as a plain call."""
    auth.authorize(request.scope["app"].state.settings, auth.presented_key(request.header), role)


class LeanRoute(Route):
    """A Starlette route whose handler gets a :class:`LeanRequest` and returns a Response.

    It sets ``scope["route"]`` like FastAPI's routes do, so the metrics middleware labels it by its
    template. Insert it in front of the documented FastAPI route of the same path and method.
    """

    def __init__(self, path: str, handler: LeanHandler, *, methods: list[str], name: str) -> None:
        super().__init__(path, endpoint=handler, methods=methods, name=name)
        self.handler = handler
        self.app = self._asgi

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        single_values(scope.get("query_string", b""))  # as the app-wide dependency of the other routes
        response = await self.handler(LeanRequest(scope, receive))
        await response(scope, receive, send)
