"""ASGI middleware for request-body size and in-flight concurrency limits.

Both answer before the application runs where they can, in the error format of the path's protocol
(:func:`service.api.errors.rendered`), so a client that sends a huge body or a burst of requests gets a
quick, readable refusal instead of a stalled or crashed worker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.api.errors import from_domain, rendered
from service.errors import CalibserveError, InvalidInput, Overloaded, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# After refusing a body we keep reading (and discarding) this much more, so that a client that writes its
# whole body before reading still receives the 413 instead of a reset connection; beyond it we stop reading.
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a streamed body passes the limit."""


class BodyOverBudget(Exception):
    """Raised inside ``receive`` when a chunk would take the bodies in flight past the limit."""


async def send_error(scope: Scope, send: Send, exc: CalibserveError, *, close: bool = False) -> None:
    """Answer ``exc`` as the one exception handler would, from outside the application."""
    status, body, media_type, headers = rendered(scope.get("path", ""), from_domain(exc))
    raw_headers = [
        (b"content-type", media_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()),
    ]
    if close:
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def drain(receive: Receive, limit: int = DRAIN_LIMIT_BYTES) -> None:
    """Read and drop the rest of the request body, up to ``limit`` bytes."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    """413 for bodies over ``max_body_bytes``, counted while streaming (chunked bodies too); 503 when the
    bodies in flight in this worker would add up to more than ``max_body_bytes``.

    The second limit bounds memory, not bandwidth: parsing a JSON body into Python objects and numpy costs
    up to ~40 bytes per byte of body (a list of one-number rows is the worst), so without it a few dozen
    concurrent maximal bodies would take a worker's memory by the tens of gigabytes. Bytes count as they
    arrive, not as declared: a client that declares 64 MiB and sends one byte holds one byte of the budget
    (and is dropped by the body rate guard, :mod:`service.api.connections`), so it cannot refuse everyone
    else's requests. A request is refused up front when the bytes already held plus its declared length
    pass the limit, and while streaming when its next chunk would take the total past it; one request
    alone is always served whatever its size (within the limit), and small bodies barely count, so only
    concurrent large uploads meet it.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.bytes_in_flight = 0

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the limit of {self.max_body_bytes} bytes (CALIBSERVE_MAX_BODY_BYTES)"
        )

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"request bodies in flight would exceed {self.max_body_bytes} bytes (CALIBSERVE_MAX_BODY_BYTES); "
            "retry shortly"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = 0
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(scope, send, InvalidInput("Content-Length is not a number"))
                    return
                if declared > limit:
                    await drain(receive)
                    await send_error(scope, send, self._too_large(), close=True)
                    return
                break
        # requests without a declared body (GET, probes, chunked uploads) are never refused here
        if declared and self.bytes_in_flight and self.bytes_in_flight + declared > limit:
            await drain(receive)
            await send_error(scope, send, self._overloaded())
            return

        received = 0
        response_started = False
        body_complete = False

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if size and self.bytes_in_flight > received and self.bytes_in_flight + size > limit:
                    raise BodyOverBudget  # others hold the rest of the budget: this one cannot grow
                received += size
                self.bytes_in_flight += size
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyOverBudget) as exc:
            if response_started:
                raise
            if not body_complete:  # past the last chunk, receive() would wait for a disconnect
                await drain(receive)
            error = self._too_large() if isinstance(exc, BodyTooLarge) else self._overloaded()
            await send_error(scope, send, error, close=True)
        finally:
            self.bytes_in_flight -= received


class ConcurrencyLimitMiddleware:
    """503 at once when more than ``max_concurrency`` requests are in flight in this worker."""

    def __init__(self, app: ASGIApp, *, max_concurrency: int) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            await send_error(
                scope,
                send,
                Overloaded(
                    f"more than {self.max_concurrency} requests in flight (CALIBSERVE_MAX_CONCURRENCY); retry shortly"
                ),
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
