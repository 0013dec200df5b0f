"""The upstream client's HTTP/1.1 pool against real sockets: a scripted server on 127.0.0.1 that answers each
request with the bytes a test gives it (keep-alive, bodies in pieces, chunked, up to the close, garbage,
silence), and uvicorn's own server for the ordinary case."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Callable

import numpy as np
import pytest
import uvloop

from service.http_pool import ConnectError, ConnectionDropped, HttpPool
from tests.helpers.requirements import require_or_skip

# (request number, request) -> the pieces to write; CLOSE among them closes the connection there
Script = Callable[[int, bytes], list[bytes | None]]
CLOSE = None


class ScriptedServer:
    """Reads whole requests (head and Content-Length body) and writes what ``script`` says, piece by piece."""

    def __init__(self, script: Script, *, ssl: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.ssl = ssl
        self.requests: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                for piece in self.script(len(self.requests), request):
                    if piece is CLOSE:
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)  # separate reads on the client's side
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def run(coroutine):
    return uvloop.run(coroutine)


def test_answers_of_stated_length_arrive_whole_through_one_kept_connection():
    payload = np.random.default_rng(0).bytes(300_000)
    pieces = [answer(payload)[:1000], answer(payload)[1000:150_000], answer(payload)[150_000:]]

    async def main():
        async with ScriptedServer(lambda n, request: pieces) as server:
            pool = HttpPool(server.url, connect_timeout=2, max_connections=4)
            replies = [await pool.request("POST", "/x", content=b"abc", timeout=5) for _ in range(3)]
            await pool.aclose()
            return replies, server

    replies, server = run(main())
    assert [bytes(reply.content) == payload for reply in replies] == [True] * 3
    assert replies[0].status == 200 and replies[0].headers["content-length"] == str(len(payload))
    assert server.connections == 1
    assert server.requests[0].endswith(b"\r\n\r\nabc") and b"Content-Length: 3\r\n" in server.requests[0]


def test_a_body_of_parts_goes_out_as_one_request_under_the_base_path():
    async def main():
        async with ScriptedServer(lambda n, request: [answer(b"{}")]) as server:
            pool = HttpPool(server.url + "/prefix", connect_timeout=2, max_connections=1)
            parts = [b'{"a":1}', memoryview(np.arange(4, dtype=np.uint8)).cast("B")]
            await pool.request("POST", "/v2/infer", content=parts, headers={"x-thing": "1"}, timeout=5)
            await pool.aclose()
            return server.requests[0]

    request = run(main())
    assert request.startswith(b"POST /prefix/v2/infer HTTP/1.1\r\n")
    assert b"Content-Length: 11\r\n" in request and b"x-thing: 1\r\n" in request
    assert request.endswith(b'{"a":1}\x00\x01\x02\x03')


def test_chunked_answers_empty_bodies_and_answers_that_end_with_the_connection():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    scripts = {
        1: [chunked],
        2: [answer(b"", status="204 No Content")],
        3: [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"],  # the length of what is not sent
        4: [answer(b"")],
        5: [b"HTTP/1.1 200 OK\r\n\r\nto ", b"the end", CLOSE],
    }

    async def main():
        async with ScriptedServer(lambda n, request: scripts[n]) as server:
            pool = HttpPool(server.url, connect_timeout=2, max_connections=1)
            replies = [await pool.request("GET", "/", timeout=5) for _ in range(5)]
            await pool.aclose()
            return replies, server.connections

    replies, connections = run(main())
    assert [bytes(reply.content) for reply in replies] == [b"hello world", b"", b"", b"", b"to the end"]
    assert [reply.status for reply in replies] == [200, 204, 304, 200, 200]
    assert connections == 1


def test_a_kept_connection_the_server_closed_meanwhile_is_replaced():
    async def main():
        async with ScriptedServer(lambda n, request: [answer(b"ok%d" % n)]) as server:
            pool = HttpPool(server.url, connect_timeout=2, max_connections=1)
            first = await pool.request("GET", "/", timeout=5)
            server.writers[0].close()  # as the server's keep-alive timeout would
            await asyncio.sleep(0.1)
            assert pool._idle[0].closed
            second = await pool.request("GET", "/", timeout=5)
            await pool.aclose()
            return first, second, server.connections

    first, second, connections = run(main())
    assert bytes(first.content) == b"ok1" and bytes(second.content) == b"ok2"
    assert connections == 2


def test_a_kept_connection_closing_as_the_request_leaves_is_replaced_not_an_error():
    async def main():
        async with ScriptedServer(lambda n, request: [answer(b"ok%d" % n)]) as server:
            pool = HttpPool(server.url, connect_timeout=2, max_connections=1)
            await pool.request("GET", "/", timeout=5)
            connection = pool._idle[0]
            connection.transport.close()  # closing, but its connection_lost has not run yet
            assert not connection.closed
            with pytest.raises(ConnectionDropped):
                connection.send([b"GET / HTTP/1.1\r\n\r\n"])
            reply = await pool.request("GET", "/", timeout=5)
            await pool.aclose()
            return reply, server.connections

    reply, connections = run(main())
    assert bytes(reply.content) == b"ok2" and connections == 2


def test_faults_are_named_refused_dropped_garbage_and_timeout():
    async def main():
        found = {}
        async with ScriptedServer(lambda n, request: [CLOSE]) as server:  # reads the request, then closes
            pool = HttpPool(server.url, connect_timeout=2, max_connections=1)
            with pytest.raises(ConnectionDropped, match="closed the connection"):
                await pool.request("GET", "/", timeout=5)
        async with ScriptedServer(lambda n, request: [b"SMTP ready\r\n\r\n"]) as server:
            pool = HttpPool(server.url, connect_timeout=2, max_connections=1)
            with pytest.raises(ConnectionDropped, match="not HTTP"):
                await pool.request("GET", "/", timeout=5)
        async with ScriptedServer(lambda n, request: [answer(b"x" * 100)[:60]]) as server:  # stalls mid-body
            pool = HttpPool(server.url, connect_timeout=2, max_connections=1)
            began = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await pool.request("GET", "/", timeout=0.3)
            found["waited"] = asyncio.get_running_loop().time() - began
            assert not pool._idle  # a timed-out connection is never reused
        closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        pool = HttpPool(f"http://127.0.0.1:{port}", connect_timeout=2, max_connections=1)
        with pytest.raises(ConnectError):
            await pool.request("GET", "/", timeout=5)
        with pytest.raises(ValueError, match="line break"):
            await pool.request("GET", "/", headers={"x": "a\r\nb"}, timeout=5)
        return found

    found = run(main())
    assert 0.25 < found["waited"] < 2


def test_requests_beyond_max_connections_wait_for_a_free_one_within_their_time_limit():
    async def main():
        def script(n, request):
            return [answer(b"%d" % n)]

        async with ScriptedServer(script) as server:
            pool = HttpPool(server.url, connect_timeout=2, max_connections=2)
            replies = await asyncio.gather(*(pool.request("GET", "/", timeout=5) for _ in range(6)))
            await pool.aclose()
            return replies, server.connections

    replies, connections = run(main())
    assert sorted(int(bytes(reply.content)) for reply in replies) == [1, 2, 3, 4, 5, 6]
    assert connections == 2


def test_an_https_upstream_is_spoken_to_over_tls_and_its_certificate_checked(tmp_path, monkeypatch):
    openssl = shutil.which("openssl")
    if openssl is None:
        require_or_skip("needs the openssl command (Debian package openssl) to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    command = [
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
    ]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    payload = np.random.default_rng(1).bytes(200_000)

    async def main():
        async with ScriptedServer(lambda n, request: [answer(payload)], ssl=server_context) as server:
            url = server.url.replace("http://", "https://")
            pool = HttpPool(url, connect_timeout=2, max_connections=1)
            try:
                return await pool.request("POST", "/x", content=b"abc", timeout=5)
            finally:
                await pool.aclose()

    with pytest.raises(ConnectError):  # a certificate nobody vouches for
        run(main())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    reply = run(main())
    assert bytes(reply.content) == payload
