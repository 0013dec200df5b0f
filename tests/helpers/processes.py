"""Processes of a running server, read from /proc: its tree, its serving workers, their memory and fds."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tests.helpers.servers import Server


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn's supervisor and its worker processes)."""
    found = [pid]
    for parent in found:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in os.listdir(f"/proc/{parent}/task"):
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
                found += [int(child) for child in children if int(child) not in found]
    return found


def serving_pids(server: Server) -> list[int]:
    """The processes that answer requests: the workers under a supervisor, or the one process itself.

    Helpers that uvicorn or multiprocessing start (a resource tracker) run no Python of ours; workers are
    recognised by their command line (``multiprocessing`` spawn children of the supervisor).
    """
    tree = process_tree(server.process.pid)
    # sorted: /proc lists tasks and children in no promised order, and callers compare these lists
    workers = sorted(pid for pid in tree[1:] if b"spawn_main" in _cmdline(pid))
    return workers or tree[:1]


def wait_for_workers(server: Server, count: int, timeout: float = 60.0) -> list[int]:
    """:func:`serving_pids` once ``count`` workers run: /readyz answers as soon as the first worker is up, while
    the others may still be importing torch. Fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while len(workers := serving_pids(server)) != count:
        assert time.monotonic() < deadline, f"{count} workers expected, found {workers}"
        time.sleep(0.05)
    return workers


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
