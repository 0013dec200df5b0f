"""Guards on connections, below the ASGI application: what a slow or oversized client may hold in a worker.

uvicorn's httptools protocol bounds none of these: a request line or header that never ends is buffered
without limit (four unfinished 50 MB header lines added 190 MB to a worker), a connection that sends its
headers a byte at a time stays open for as long as it likes (800 such connections were all still open
after 12 s), and a body declared but never sent holds its request, and what it reserved, forever.
:class:`GuardedHttpToolsProtocol` (uvicorn's protocol, subclassed, passed as ``http=``) adds, per worker:

``max_connections`` (default 1024)
    Open connections. One more is answered 503 at once and closed: a bound on file descriptors and on
    everything a connection holds, well above what a client pool or a proxy in front opens.
``header_timeout_s`` (default 10 s)
    From a connection's start (or a request's first byte on a kept-alive connection) to the end of its
    headers: 408 and closed (a connection that sent nothing at all is just closed). A real client sends
    its headers in one packet; 10 s covers a congested link with room to spare, and bounds how long a
    slowloris connection lives.
``max_header_bytes`` (default 32 KiB)
    Request line and headers together: 431 and closed. 32 KiB is what nginx (4 x 8 KiB buffers) and
    Kestrel allow; this service's own headers (keys, tensor shape and type) take well under 1 KiB.
``body_min_rate`` (default 1024 bytes/s) after ``body_grace_s`` (default 10 s)
    Once a body has been arriving for the grace period, its average rate since its start must be at least
    this, or the request is answered 408 and closed. Time during which the service itself is not reading
    (the application has not asked for more, so the socket is paused) does not count. 1 KiB/s is far below
    any real link (a 64 MiB body at that rate would take 18 hours) and only drops a connection that holds
    its slot while sending next to nothing, which is the attack.

Refusals are written in the path's error format (problem+json, or ``{"error"}`` under ``/v2``) with
``Connection: close``; the connection is then half-closed and its remaining input read and dropped for a
moment (:data:`LINGER_S`), so the client reads the answer instead of a reset.

The limits are read from the settings (``CALIBSERVE_*``) when a worker's first connection is made.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, NamedTuple

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.errors import TITLES, from_domain, rendered
from service.config import Settings, get_settings
from service.errors import CalibserveError, HeadersTooLarge, Overloaded, RequestTimeout

LINGER_S = 2.0  # after a refusal, how long the rest of the client's input is read and dropped
TICK_S = 0.5  # how often a body's rate is checked


class ConnectionLimits(NamedTuple):
    max_connections: int
    header_timeout_s: float
    max_header_bytes: int
    body_min_rate: int
    body_grace_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            settings.max_connections,
            settings.header_timeout_s,
            settings.max_header_bytes,
            settings.body_min_rate,
            settings.body_grace_s,
        )


class _Refusal(Exception):
    """Raised inside a parser callback; the protocol answers ``error`` and closes."""

    def __init__(self, error: CalibserveError) -> None:
        super().__init__(error.message)
        self.error = error


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded connections, header size and time, and body rate."""

    limits: ClassVar[ConnectionLimits | None] = None  # the worker's, from its settings on first use

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if GuardedHttpToolsProtocol.limits is None:
            GuardedHttpToolsProtocol.limits = ConnectionLimits.from_settings(get_settings())
        self.guard: ConnectionLimits = GuardedHttpToolsProtocol.limits
        self.in_head = True  # from the connection (or a request's first byte) to the end of its headers
        self.head_bytes = 0
        self.head_started = False  # some byte of the current request has arrived
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_received = 0
        self.body_active_s = 0.0
        self.refused = False

    # ------------------------------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_connections:
            self.refuse(
                Overloaded(
                    f"more than {self.guard.max_connections} connections are open to this worker "
                    "(CALIBSERVE_MAX_CONNECTIONS); retry shortly"
                )
            )
            return
        self.arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.refused:
            self.transport.close()
        return super().eof_received()

    def cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    # ---------------------------------------------------------------------------------------- reading

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped until the linger ends
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refusal):
                self.refuse(exc.__context__.error)
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self.in_head and self.head_started:
            # the whole chunk went to an unfinished head (llhttp buffers a header line until it ends)
            self.head_bytes += len(data)
            if self.head_bytes > self.guard.max_header_bytes:
                self.refuse(self.headers_too_large())

    def headers_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"the request line and headers are over {self.guard.max_header_bytes} bytes "
            "(CALIBSERVE_MAX_HEADER_BYTES)"
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_started = True
        self.head_bytes = 0
        if self.head_timer is None:  # a request on a kept-alive connection: its own time starts now
            self.arm_head_timer()

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.guard.max_header_bytes:
            raise _Refusal(self.headers_too_large())
        self.in_head = False
        self.head_started = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().on_headers_complete()
        if self.guard.body_min_rate > 0 and self.has_body():
            self.body_received = 0
            self.body_active_s = 0.0
            self.body_timer = self.loop.call_later(TICK_S, self.check_body_rate)

    def has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"", b"0")
            if name == b"transfer-encoding":
                return True
        return False

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        super().on_message_complete()

    # --------------------------------------------------------------------------------------- deadlines

    def arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.guard.header_timeout_s, self.head_timed_out)

    def head_timed_out(self) -> None:
        self.head_timer = None
        if not self.in_head or self.transport.is_closing():
            return
        if not self.head_started:  # nothing of a request arrived: an idle connection, closed quietly
            self.transport.close()
            return
        self.refuse(
            RequestTimeout(
                f"the request line and headers did not arrive within {self.guard.header_timeout_s:g} s "
                "(CALIBSERVE_HEADER_TIMEOUT_S)"
            )
        )

    def check_body_rate(self) -> None:
        self.body_timer = None
        if self.refused or self.transport.is_closing():
            return
        # Time counts only while the client is the one to wait for: not while reading is paused (the
        # application has not asked for more), nor before "100 Continue" went out to a client that asked.
        waiting_for_us = self.flow.read_paused or (
            self.cycle is not None and self.cycle.waiting_for_100_continue
        )
        if not waiting_for_us:
            self.body_active_s += TICK_S
        guard = self.guard
        if (
            self.body_active_s > guard.body_grace_s
            and self.body_received < guard.body_min_rate * self.body_active_s
        ):
            self.refuse(
                RequestTimeout(
                    f"the request body arrived at {self.body_received / self.body_active_s:.0f} bytes/s, below "
                    f"the minimum of {guard.body_min_rate} bytes/s (CALIBSERVE_BODY_MIN_RATE) after "
                    f"{guard.body_grace_s:g} s (CALIBSERVE_BODY_GRACE_S)"
                )
            )
            return
        self.body_timer = self.loop.call_later(TICK_S, self.check_body_rate)

    # ---------------------------------------------------------------------------------------- refusing

    def refuse(self, error: CalibserveError) -> None:
        """Answer ``error`` (unless a response has started), stop the request, and close after a linger."""
        if self.refused:
            return
        self.refused = True
        self.cancel_timers()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if (
            self.in_head
        ):  # a new request's head: answerable unless an earlier (pipelined) answer is unfinished
            can_answer = cycle is None or cycle.response_complete
        else:  # a body: answerable unless the application has begun its answer
            can_answer = cycle is None or not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's receive() answers http.disconnect, its send() drops
            cycle.message_event.set()
        if not can_answer or self.transport.is_closing():
            self.transport.close()
            return
        path = self.url.split(b"?", 1)[0].decode("latin-1") if getattr(self, "url", b"") else "/"
        status, body, media_type, headers = rendered(path, from_domain(error))
        lines = [f"HTTP/1.1 {status} {TITLES.get(status, 'Error')}", f"content-type: {media_type}"]
        lines += [f"content-length: {len(body)}", "connection: close"]
        lines += [f"{name.lower()}: {value}" for name, value in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.flow.resume_reading()  # keep reading (and dropping) so the client can finish sending
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
