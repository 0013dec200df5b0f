"""A keep-alive pool of HTTP/1.1 connections to one origin, on asyncio and httptools' response parser.

It is the upstream client's transport (:mod:`service.upstream`), in the request path of every proxied
inference. aiohttp's client did this before; it spent 0.25 ms of CPU per call on a 1 x 10 inference and
0.40 ms on 64 x 1000 (256 KB each way) against a local Triton, where this pool spends 0.11 and 0.21 ms
(``bench/bench_upstream_client.py``), and the proxy's whole budget is 1 ms. httptools is uvicorn's parser,
already installed with the server; the pool itself is the little HTTP/1.1 a client of one server needs: one
request at a time per connection, a body of known length, answers of known length, chunked or up to the
close.

Errors are the caller's to name: :class:`ConnectError` when no connection could be made (refused,
unreachable, unknown host), :class:`ConnectionDropped` when the server closed the connection or sent
something that is not HTTP before the answer was whole, TimeoutError when the request's time limit passed.
A request cut short (timed out or cancelled) closes its connection, never returns it to the pool.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
import numpy as np

__all__ = ["ConnectError", "ConnectionDropped", "HttpPool", "Response"]

Buffer = bytes | bytearray | memoryview


class ConnectError(OSError):
    """No connection to the server could be made."""


class ConnectionDropped(ConnectionError):
    """The connection closed, or the server wrote something that is not HTTP, before the answer was whole."""


@dataclass(frozen=True, slots=True)
class Response:
    """An answer, read whole; ``headers`` by lower-case name (a repeated header: its last value).
    ``content`` is a memoryview where the answer stated its length (the bytes were received in place)."""

    status: int
    headers: dict[str, str]
    content: bytes | memoryview
    reason: str = ""


# What one read takes at most while the answer's head (or a body of no stated length) arrives.
_READ_SIZE = 65536


class _Connection(asyncio.BufferedProtocol):
    """One connection: a request written, its answer parsed as it arrives, then the next.

    httptools parses the head (it calls the ``on_*`` methods). The body of an answer that states its length
    is then received in place, straight into one buffer of that length: none of the copies of a parsed
    body (the event loop's bytes of each read, httptools' bytes of each body piece, their join). In a
    server's request path a copy of 256 KB costs about 60 us here, far more than in a loop that copies the
    same cached buffer (measured: six more copies per request added 0.33 to 0.43 ms of CPU to a proxied
    64 x 1000 inference). A chunked answer, or one that ends with the connection, goes through httptools
    whole.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[Response] | None = None
        self.closed = False
        self.received = False  # a byte of the current answer arrived
        self.reusable = False
        self._scratch = bytearray(_READ_SIZE)
        self._scratch_view = memoryview(self._scratch)
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._pieces: list[bytes] = []
        self._reason = b""
        self._until_close = False
        self._keep_alive = False
        self._body: memoryview | None = None  # the body of stated length, filled in place
        self._filled = 0
        self._in_place = False  # the body's remaining bytes are received straight into it

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # a request's head and body leave in one write; Nagle would hold the next request's head
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._in_place:
            return self._body[self._filled :]  # type: ignore[index]
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        self.received = True
        if self._in_place:
            self._filled += nbytes
            if self._filled == len(self._body):  # type: ignore[arg-type]
                self._complete()
            return
        try:
            self.parser.feed_data(self._scratch_view[:nbytes])
        except httptools.HttpParserError as exc:
            self._fail(ConnectionDropped(f"the server's answer is not HTTP: {exc}"))
            self.close()
            return
        if self._body is not None and self.answer is not None:
            self._in_place = True  # the head is parsed: the rest of the body comes straight into it

    def eof_received(self) -> bool:
        return False  # close: an answer is never written after the server's end of stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_close and self.answer is not None and not self.answer.done():
            self._complete()  # an answer of no stated length ends with the connection
        detail = f": {exc}" if exc is not None else ""
        self._fail(ConnectionDropped(f"the server closed the connection before its answer was whole{detail}"))

    # httptools' callbacks
    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        headers = dict(self._headers)
        status = self.parser.get_status_code()
        self._keep_alive = self.parser.should_keep_alive()
        if status < 200 or status in (204, 304):
            return  # no body, whatever the head says
        length = headers.get("content-length")
        if "transfer-encoding" in headers:
            return
        if length is None:
            self._until_close = True
        elif length.isdigit() and int(length):
            # uninitialised (a bytearray would be zero-filled first: one more pass over the body)
            self._body = np.empty(int(length), dtype=np.uint8).data

    def on_body(self, body: bytes) -> None:
        if self._body is None:
            self._pieces.append(body)
        else:  # the part of the body that came with the head
            self._body[self._filled : self._filled + len(body)] = body
            self._filled += len(body)

    def on_message_complete(self) -> None:
        self._complete()

    def _complete(self) -> None:
        answer, self.answer = self.answer, None
        self.reusable = self._keep_alive and not self.closed
        if answer is not None and not answer.done():
            if self._body is not None:
                content: bytes | memoryview = self._body
            else:
                content = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
            status = self.parser.get_status_code()
            reason = self._reason.decode("latin-1")
            answer.set_result(Response(status, dict(self._headers), content, reason))
        self._reset()  # the parser of an answer received in place never saw its body end

    # the pool's
    def send(self, parts: list[bytes | memoryview]) -> asyncio.Future[Response]:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionDropped("the connection closed before the request left")
        self.answer = asyncio.get_running_loop().create_future()
        self.received = self.reusable = False
        self.transport.writelines(parts)
        return self.answer

    def expire(self, timeout: float) -> None:
        """The request's time is up: its answer fails, and the connection, mid-answer, closes."""
        self._fail(TimeoutError(f"no whole answer within {timeout:g} s"))
        self.close()

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()


class HttpPool:
    """Keep-alive HTTP/1.1 connections to the origin of ``url`` (``http://`` or ``https://``, with an optional
    base path that prefixes every request's), at most ``max_connections`` at a time; a request waits for a
    free one beyond that. A connection is made on first need, within ``connect_timeout`` seconds, and kept
    while the server keeps it."""

    def __init__(self, url: str, *, connect_timeout: float, max_connections: int) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an HTTP pool needs an http:// or https:// URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        authority = parts.netloc.rpartition("@")[2]
        self._head = f"Host: {authority}\r\nUser-Agent: calibserve\r\n"
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: Buffer | Sequence[Buffer] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float,
    ) -> Response:
        """The server's answer to one request, within ``timeout`` seconds in all (waiting for a free
        connection, connecting, writing, reading), else TimeoutError.

        ``content`` is the body, or the parts it is made of (written as they are, one after the other, never
        joined), each a bytes-like object of bytes (``len`` is its byte count). HEAD is not a method this
        pool sends. A pooled connection that turns out to have been closed by the server before it answered
        a byte (its keep-alive ran out as the request left) is replaced by a new one; any other failure
        raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        body = [content] if isinstance(content, Buffer) else list(content or ())
        head = self._request_head(method, path, sum(len(part) for part in body), headers)
        parts = [head, *body]
        if self._slots.locked():  # every connection busy: wait for one, within the time limit
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            while True:
                connection, reused = await self._connection(deadline)
                # a timer of the loop's own rather than asyncio.timeout: a tenth of its cost, per request
                timer = loop.call_at(deadline, connection.expire, timeout)
                try:
                    response = await connection.send(parts)
                except ConnectionDropped:
                    if reused and not connection.received:
                        continue
                    raise
                except BaseException:  # cancelled mid-answer: the connection cannot be reused
                    connection.close()
                    raise
                finally:
                    timer.cancel()
                if connection.reusable:
                    self._idle.append(connection)
                else:
                    connection.close()
                return response
        finally:
            self._slots.release()

    def _request_head(self, method: str, path: str, length: int, headers: Mapping[str, str] | None) -> bytes:
        lines = [f"{method} {self.base_path}{path} HTTP/1.1\r\n", self._head]
        if length or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {length}\r\n")
        for name, value in (headers or {}).items():
            if any(c in name or c in value for c in "\r\n") or ":" in name:
                raise ValueError(f"header {name!r} cannot be sent: it holds a line break or a colon")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _connection(self, deadline: float) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have timed out
            if not connection.closed and not connection.transport.is_closing():  # type: ignore[union-attr]
                return connection, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self.connect_timeout)):
                _, connection = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"no connection to {self.host}:{self.port} within {self.connect_timeout} s"
            ) from None
        except OSError as exc:
            raise ConnectError(exc.errno, exc.strerror or str(exc)) from None
        return connection, False

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
