"""Free loopback ports for the servers tests and benchmarks start, safe when the suite runs on several processes.

``bind(("127.0.0.1", 0))`` returns a port the kernel just freed, which another process of the suite (a second
pytest-xdist worker, a bench it runs) may be handed too before the first server binds it; a server that then
fails to bind leaves its client talking to someone else's. Under pytest-xdist each worker takes its ports from
a block of its own, below the kernel's ephemeral range (so that no outgoing connection holds one either),
which its subprocesses inherit through ``PYTEST_XDIST_WORKER``.
"""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path

BLOCK = 2000  # ports per xdist worker
FIRST = 10_000  # the first worker's block starts here
_LOCAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(_LOCAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _block() -> range | None:
    """This xdist worker's ports, or None outside xdist (or where its block would reach the ephemeral range)."""
    match = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    if match is None:
        return None
    start = FIRST + int(match.group(1)) * BLOCK
    if start + BLOCK > _ephemeral_start():
        return None
    return range(start, start + BLOCK)


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody holds now, from this worker's block under pytest-xdist, and not one this process
    handed out before: a server claims its ports some time before it binds them (calibserve locks its HTTP
    and gRPC ports at once, then binds them in its workers), so two picks in a row must not repeat."""
    block = _block()
    if block is not None:
        if len(_handed_out) > BLOCK // 2:
            _handed_out.clear()
        for port in random.sample(block, 200):
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
