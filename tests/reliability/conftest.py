"""Shared pieces of the reliability tests: real servers, raw HTTP, process and store inspection, figures.

Every test here talks to a real ``python -m service serve`` process (``tests.servers.Server``) over
127.0.0.1 unless it says otherwise. Tests that take the ``soak`` fixture run twice: quick in ``make test``,
at full scale (marked ``slow``) in ``make soak``. The figures each test measures are printed in a
"reliability figures" section at the end of the run (and written as JSON to ``$CALIBSERVE_FIGURES`` if set).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.servers import REPO, Server

SHIPPED_MODELS = REPO / "models"
FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture(
    params=[pytest.param(False, id="quick"), pytest.param(True, id="soak", marks=pytest.mark.slow)]
)
def soak(request) -> bool:
    """Run a test twice: a quick variant for ``make test`` and a long one, marked slow, for ``make soak``."""
    return request.param


def record_figures(test: str, **figures: Any) -> None:
    FIGURES.setdefault(test, {}).update(figures)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, figures in FIGURES.items():
        shown = ", ".join(f"{key}={value}" for key, value in figures.items())
        terminalreporter.write_line(f"{test}: {shown}")
    target = os.environ.get("CALIBSERVE_FIGURES")
    if target:
        Path(target).write_bytes(orjson.dumps(FIGURES, option=orjson.OPT_INDENT_2))


# ------------------------------------------------------------------------------------------------- servers


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    """``servers(store, workers=, env=)`` starts a real server; every one still running is killed at the end."""
    started: list[Server] = []

    def start(store: Path, **kwargs: Any) -> Server:
        kwargs.setdefault("models", SHIPPED_MODELS)
        server = Server(store, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        # SIGKILL: this is cleanup only. A SIGTERM to the whole process group while a worker is still starting
        # was seen to leave uvicorn's supervisor blocked with both workers exited, until the 30 s stop timeout.
        with contextlib.suppress(ProcessLookupError):  # one vanished group must not spare the others
            server.stop(signal.SIGKILL)


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
    workers = [pid for pid in tree[1:] if b"spawn_main" in _cmdline(pid)]
    return workers or tree[:1]


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


# ----------------------------------------------------------------------------------------------- raw HTTP


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


# -------------------------------------------------------------------------------------------------- store


def store_entries(store: Path) -> set[str]:
    """Every path under the store, relative to it (directories included)."""
    return {str(path.relative_to(store)) for path in store.rglob("*")} if store.exists() else set()


def temp_files(store: Path) -> list[str]:
    return sorted(entry for entry in store_entries(store) if entry.endswith(".tmp"))


def check_store(store: Path) -> dict[str, dict[str, Any]]:
    """Assert the store's invariants on disk; return ``{model: {"active": v, "versions": {v: document}}}``.

    Invariants: every version file parses as a JSON object naming its model and its own number; every
    ``active`` pointer names an existing version; every version number has its reservation marker.
    """
    state: dict[str, dict[str, Any]] = {}
    for model_dir in sorted(
        path for path in store.iterdir() if path.is_dir() and not path.name.startswith(".")
    ):
        name = model_dir.name
        assert orjson.loads((model_dir / "model.json").read_bytes()), name
        versions: dict[int, dict[str, Any]] = {}
        calibrators = model_dir / "calibrators"
        for path in calibrators.glob("*.json") if calibrators.exists() else ():
            document = orjson.loads(path.read_bytes())  # a torn file fails here
            version = int(path.stem)
            assert document["version"] == version and document["model"] == name, path
            assert (calibrators / ".reserved" / str(version)).exists(), f"{path}: no reservation marker"
            versions[version] = document
        pointer = model_dir / "active"
        active = int(pointer.read_text()) if pointer.exists() else None
        assert active is None or active in versions, f"{name}: active pointer names missing version {active}"
        state[name] = {"active": active, "versions": versions}
    return state


# ------------------------------------------------------------------------------------------ file systems


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path``; pytest.skip where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode=0755",
            f"calibserve-{uuid.uuid4().hex[:8]}",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


# --------------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def digits_logits() -> dict[str, np.ndarray]:
    """The shipped digits MLP: validation logits/labels to fit on, test logits and inputs to serve."""
    folder = SHIPPED_MODELS / "digits-mlp"
    with np.load(folder / "validation.npz") as validation, np.load(folder / "test.npz") as test:
        return {
            "fit_logits": validation["logits"].astype(np.float64),
            "fit_labels": validation["labels"],
            "logits": test["logits"].astype(np.float64),
            "inputs": test["inputs"],
        }


@pytest.fixture(scope="session")
def fit_body(digits_logits) -> dict[str, list]:
    """The JSON body of a fit on the digits validation logits."""
    return {"logits": digits_logits["fit_logits"].tolist(), "labels": digits_logits["fit_labels"].tolist()}


def softmax_t(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Reference softmax(z / T) in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
