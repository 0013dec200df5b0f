"""Slow and oversized clients against a real server (``service/api/connections.py``, ``api/limits.py``).

Found here (issue #11): one calibrate that declared 64 MiB, sent one byte and went silent made every other
request with a body on that worker answer 503 for as long as it stayed open (the declared length was
reserved from the in-flight budget); four unfinished 50 MB header lines added 190 MB to the worker; 800
slowloris connections were all still open after 12 s. Now a body that does not arrive at the minimum rate
is answered 408 and closed, bytes count against the in-flight budget as they arrive, request heads are
bounded in size (431) and time (408), connections per worker are bounded (503), and a normal client is
served throughout.

The limits are set small here (a 1 s header timeout, a 2 KiB head, a 1 s body grace) so the test is quick;
every wait is bounded, none is a timing threshold.
"""

from __future__ import annotations

import contextlib
import socket
import time

import orjson
import pytest

from tests.helpers.processes import serving_pids, status_kib
from tests.helpers.rawhttp import connect, read_response, request_head

ENV = {
    "CALIBSERVE_HEADER_TIMEOUT_S": "1",
    "CALIBSERVE_MAX_HEADER_BYTES": "2048",
    "CALIBSERVE_BODY_MIN_RATE": "1000",
    "CALIBSERVE_BODY_GRACE_S": "1",
    "CALIBSERVE_MAX_CONNECTIONS": "40",
    "CALIBSERVE_MAX_BODY_BYTES": str(64 << 20),
}
BODY = orjson.dumps({"logits": [[1.0, 0.0], [0.0, 1.0]]})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.helpers.data import SHIPPED_MODELS
    from tests.helpers.servers import Server

    running = Server(tmp_path_factory.mktemp("slow") / "store", models=SHIPPED_MODELS, env=ENV)
    with running.client() as http:
        assert http.put("/v1/models/m", json={"num_classes": 2}).status_code == 201
    yield running
    running.stop()


def calibrate(port: int) -> int:
    head = request_head(
        "POST",
        "/v1/models/m/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(len(BODY)), "Connection": "close"},
    )
    with connect(port, timeout=10) as sock:
        sock.sendall(head + BODY)
        return read_response(sock).status


def closed_by_server(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything the server writes until it closes the connection (bounded wait)."""
    sock.settimeout(timeout)
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split()[1])


def test_a_stalled_body_neither_blocks_others_nor_lives_forever(server):
    head = request_head(
        "POST",
        "/v1/models/m/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(64 << 20)},
    )
    with connect(server.port) as stalled:
        stalled.sendall(head + b"{")
        # the declared 64 MiB reserve nothing: a normal request with a body is served meanwhile
        for _ in range(3):
            assert calibrate(server.port) == 200
        answer = closed_by_server(stalled)
    assert status_of(answer) == 408 and b"CALIBSERVE_BODY_MIN_RATE" in answer
    assert b"application/problem+json" in answer
    assert calibrate(server.port) == 200


def test_a_slow_body_under_the_oip_path_is_answered_in_its_format(server):
    head = request_head(
        "POST", "/v2/models/m/infer", {"Content-Type": "application/json", "Content-Length": "100000"}
    )
    with connect(server.port) as stalled:
        stalled.sendall(head + b"{")
        answer = closed_by_server(stalled)
    assert status_of(answer) == 408
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1]).keys() == {"error"}


def test_oversized_and_slow_heads_are_refused_and_closed(server):
    (worker,) = serving_pids(server)
    rss_before = status_kib(worker, "VmRSS")
    huge_line = []
    for _ in range(4):  # an unfinished header line, far past the limit: 431, and memory stays put
        sock = connect(server.port)
        huge_line.append(sock)
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * (4 << 20))
    loris = []
    for _ in range(10):  # a header a byte at a time: 408 once the header timeout passes
        sock = connect(server.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-A: ")
        loris.append(sock)
    idle = connect(server.port)  # nothing at all: closed quietly
    try:
        assert calibrate(server.port) == 200  # a normal client meanwhile
        for sock in huge_line:
            answer = closed_by_server(sock)
            assert status_of(answer) == 431 and b"CALIBSERVE_MAX_HEADER_BYTES" in answer
        for sock in loris:
            with contextlib.suppress(OSError):
                sock.sendall(b"b")
            answer = closed_by_server(sock)
            assert status_of(answer) == 408 and b"CALIBSERVE_HEADER_TIMEOUT_S" in answer
        assert closed_by_server(idle) == b""
    finally:
        for sock in [*huge_line, *loris, idle]:
            sock.close()
    assert status_kib(worker, "VmRSS") - rss_before < 64 << 10  # KiB: far below the 16 MiB sent
    # a head just past the limit in one complete packet is refused too
    with connect(server.port) as sock:
        sock.sendall(request_head("GET", "/healthz", {"X-Pad": "a" * 3000}))
        assert status_of(closed_by_server(sock)) == 431
    assert calibrate(server.port) == 200


def test_connections_per_worker_are_bounded(server):
    held = []
    try:
        refused = None
        for _ in range(60):  # more than CALIBSERVE_MAX_CONNECTIONS (40)
            sock = connect(server.port)
            held.append(sock)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                if sock.recv(1 << 16, socket.MSG_PEEK):
                    refused = sock
                    break
            sock.setblocking(True)
        if refused is None:  # the refusal may take a moment to arrive: the last one opened is over the limit
            refused = held[-1]
        refused.setblocking(True)
        answer = closed_by_server(refused)
        assert status_of(answer) == 503 and b"CALIBSERVE_MAX_CONNECTIONS" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 15
    while calibrate_or_refused(server.port) != 200:  # the closed ones are released at once
        assert time.monotonic() < deadline
        time.sleep(0.05)


def calibrate_or_refused(port: int) -> int:
    try:
        return calibrate(port)
    except (ConnectionError, OSError):
        return 0


def test_kept_alive_connections_serve_many_requests(server):
    head = request_head(
        "POST",
        "/v1/models/m/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(len(BODY))},
    )
    with connect(server.port) as sock:
        for _ in range(5):
            sock.sendall(head + BODY)
            assert read_response(sock).status == 200
            time.sleep(0.3)  # pauses between requests are the keep-alive timeout's business, not the head's


def test_malformed_tensor_headers_are_400_and_keep_the_connection(server):
    """Issue #11 part 3 on a real server: these were 500s that logged two tracebacks and dropped the
    connection; now 400 in the path's format, and the same connection serves the next request."""
    npy_f1 = b"\x93NUMPY\x01\x00" + (76).to_bytes(2, "little")
    npy_f1 += b"{'descr': '<f1', 'fortran_order': False, 'shape': (0,), }".ljust(75) + b"\n"
    oip = orjson.dumps({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [0, 10**19], "data": []}]})
    cases = [
        (
            "/v1/models/m/calibrate",
            {"Content-Type": "application/octet-stream", "X-Tensor-Shape": "1,\xb3"},
            b"\0" * 8,
        ),
        (
            "/v1/models/m/calibrate",
            {"Content-Type": "application/octet-stream", "X-Tensor-Shape": "0,99999999999999999999999"},
            b"",
        ),
        ("/v1/models/m/calibrate", {"Content-Type": "application/x-npy"}, npy_f1),
        ("/v2/models/m/infer", {"Content-Type": "application/json"}, oip),
    ]
    follow = request_head(
        "POST",
        "/v1/models/m/calibrate",
        {"Content-Type": "application/json", "Content-Length": str(len(BODY))},
    )
    for path, headers, body in cases:
        with connect(server.port) as sock:
            sock.sendall(request_head("POST", path, {**headers, "Content-Length": str(len(body))}) + body)
            answer = read_response(sock)
            assert answer.status == 400, (path, headers, answer)
            if path.startswith("/v2"):
                assert answer.json().keys() == {"error"}
            else:
                assert answer.headers["content-type"] == "application/problem+json"
            sock.sendall(follow + BODY)
            assert read_response(sock).status == 200
