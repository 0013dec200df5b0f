"""Multi-worker serving, checked on the server's own sockets: TCP_NODELAY, and one listener per worker.

Under the asyncio loop, uvicorn's workers accept from a shared listener without setting TCP_NODELAY
(Kludex/uvicorn#3149), and small answers then wait on Nagle's algorithm. The checks here are socket
options, not timings: each worker's sockets are duplicated into this process with ``pidfd_getfd(2)``
(Linux 5.6+, same user) and asked with ``getsockopt``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import time
from pathlib import Path

import pytest

from service.api.server import loop_and_parser
from tests.helpers.rawhttp import read_response
from tests.helpers.servers import Server

SYS_PIDFD_GETFD = 438  # x86_64 and aarch64
CONNECTIONS = 8


def descendants(pid: int) -> list[int]:
    try:
        found = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return found + [grandchild for child in found for grandchild in descendants(child)]


def server_sockets(pid: int) -> list[tuple[str, socket.socket]]:
    """``(inode, duplicate)`` of each TCP socket process ``pid`` holds (the caller closes them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    sockets = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:"):
                continue
            duplicate = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if duplicate < 0:
                code = ctypes.get_errno()
                if code in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                    pytest.skip(f"pidfd_getfd is not available here: {os.strerror(code)}")
                continue
            sock = socket.socket(fileno=duplicate)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                sockets.append((target, sock))
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return sockets


def listeners(server: Server) -> dict[int, set[str]]:
    """Worker pid -> inodes of the sockets it listens on at the server's port."""
    found: dict[int, set[str]] = {}
    for pid in descendants(server.process.pid):
        for inode, sock in server_sockets(pid):
            with sock:
                if (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == server.port
                ):
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                    found.setdefault(pid, set()).add(inode)
    return found


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("store"), workers=2) as server:
        # /readyz answered from the first worker up; the second may still be importing torch
        deadline = time.monotonic() + 60
        while len(listeners(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield server


def test_uvloop_and_httptools_are_chosen_when_installed():
    pytest.importorskip("uvloop")
    pytest.importorskip("httptools")
    assert loop_and_parser() == ("uvloop", "httptools")


def test_every_accepted_connection_has_tcp_nodelay(two_workers):
    clients = []
    try:
        for _ in range(CONNECTIONS):
            client = socket.create_connection(("127.0.0.1", two_workers.port))
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            # accepted and served (the whole answer read: one recv may return only part of it): keep it open
            assert read_response(client).status == 200
            clients.append(client)
        ours = {client.getsockname() for client in clients}
        found: dict[tuple, int] = {}
        workers_seen = set()
        for pid in descendants(two_workers.process.pid):
            for _, sock in server_sockets(pid):
                with sock:
                    try:
                        peer = sock.getpeername()
                    except OSError:  # a listener
                        continue
                    if peer in ours:
                        found[peer] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                        workers_seen.add(pid)
        assert set(found) == ours, "every connection is held by one of the workers"
        assert all(found.values()), f"accepted sockets without TCP_NODELAY: {found}"
        assert workers_seen  # at least one worker answered (balance is the kernel's business)
    finally:
        for client in clients:
            client.close()


def test_each_worker_listens_on_its_own_reuseport_socket(two_workers):
    """One SO_REUSEPORT listener per worker (not uvicorn's shared one), so the kernel spreads connections."""
    found = listeners(two_workers)
    assert len(found) == 2, f"listening workers: {found}"
    (first, second) = found.values()
    assert not first & second, "the workers share a listening socket"
