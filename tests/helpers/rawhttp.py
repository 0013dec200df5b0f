"""Byte-exact HTTP/1.1 over a plain socket: requests sent as written (no client-side normalisation)."""

from __future__ import annotations

import socket
from typing import Any

import orjson


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"RawResponse({self.status}, {self.body[:200]!r})"


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: socket.socket) -> RawResponse:
    """One HTTP/1.1 response (Content-Length or chunked body) from ``sock``."""
    buffer = (
        bytearray()
    )  # bytearray: appending is amortised O(1), bytes += would copy the whole body each time
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(
                f"connection closed before a complete response head: {bytes(buffer[:200])!r}"
            )
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    status_line, *header_lines = buffer[:end].decode("latin-1").split("\r\n")
    rest = buffer[end + 4 :]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()

    def fill(size: int) -> None:
        while len(rest) < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("connection closed inside a response body")
            rest.extend(chunk)

    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in rest:
                fill(len(rest) + 1)
            line_end = rest.index(b"\r\n")
            size = int(rest[:line_end], 16)
            del rest[: line_end + 2]
            fill(size + 2)
            body += rest[:size]
            del rest[: size + 2]
            if size == 0:
                break
    else:
        length = int(headers.get("content-length", "0"))
        fill(length)
        body = rest[:length]
    return RawResponse(int(status_line.split()[1]), headers, bytes(body))


def raw_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> RawResponse:
    """One request on a fresh connection, the path sent byte for byte (no client-side normalisation)."""
    headers = {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    with connect(port) as sock:
        sock.sendall(request_head(method, path, headers) + body)
        return read_response(sock)
