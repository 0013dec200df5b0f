"""A real Triton Inference Server for end-to-end tests: ``tests/triton/serve.py`` (NVIDIA PyTriton) on free
loopback ports, run by its own interpreter (``.venv-triton``, made by ``make install``: PyTriton needs numpy<2).

Tests talk to it over HTTP only (``server.url``). Its models, their inputs and outputs, are listed in
``tests/triton/serve.py``; the parameters W, b, w of the linear ones come from ``tests/triton/weights.json``,
read here too (``server.W``...). ``start_triton()`` returns a started :class:`TritonServer`; ``stop()`` stops it
(SIGINT, then SIGKILL to its whole process group after a short grace) and removes what Triton and its Python
stubs leave behind (shared memory under /dev/shm, temporary model folders, the PyTriton workspace);
``start()`` brings it back on the same ports. :func:`triton_unavailable_reason` says why Triton cannot run here.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from tests.helpers.data import REPO
from tests.helpers.servers import free_port, port_is_free

TRITON_DIR = REPO / "tests" / "triton"
SERVE_SCRIPT = TRITON_DIR / "serve.py"
WEIGHTS_FILE = TRITON_DIR / "weights.json"
TRITON_VENV = REPO / ".venv-triton"
# Another interpreter with nvidia-pytriton installed, instead of .venv-triton's.
TRITON_PYTHON_ENV = "CALIBSERVE_TRITON_PYTHON"
# The models serve.py binds (without --models), and "lookup" when it is given an array.
MODELS = ("linear", "linear16", "linear64", "binary", "multi", "slow", "wrong", "nan")
# Models serve.py binds only when named (``start_triton(models=...)``): x -> logits = x, 10 and 1000 wide, for
# bench/bench_proxy.py. Not in the default set: every model is a stub process that the tests' Triton would start.
ON_REQUEST_MODELS = ("identity10", "identity1000")
MAX_BATCH = {**dict.fromkeys((*MODELS, *ON_REQUEST_MODELS), 64), "lookup": 1024}
START_TIMEOUT = 60.0
# Seconds stop() waits after SIGINT for serve.py to unload the models and stop Triton (which removes the stubs'
# shared memory and folders itself) before it kills the process group. Unloading waits for requests in flight.
STOP_GRACE = 5.0
SLOW_SECONDS = 3.0
# Lines of Triton's log that mean it will not come up: serve.py itself would wait for minutes.
_FATAL = re.compile(r"failed to start|already in use|Traceback \(most recent call last\)")
_SHM = Path("/dev/shm")
_SHM_PREFIXES = ("psm_", "pytrtion")  # multiprocessing.shared_memory (PyTriton's tensors), the Python backend
_TEMP_FOLDER = re.compile(r"folder[A-Za-z0-9]{6}")  # Triton's mkdtemp("/tmp/folderXXXXXX") per loaded model

_START_FAILURES: list[str] = []
_UNCLOSED: set[TritonServer] = set()  # closed at exit if a test run forgot one


class TritonStartError(RuntimeError):
    """serve.py exited, or did not serve every model within the timeout; the message ends with its log."""


def triton_python() -> Path:
    return Path(os.environ.get(TRITON_PYTHON_ENV) or TRITON_VENV / "bin" / "python")


@functools.cache
def _interpreter_problem(python: Path) -> str | None:
    if not python.exists():
        return f"no {python}: `make install` creates .venv-triton (nvidia-pytriton, tests/triton/requirements.txt)"
    try:
        probe = subprocess.run(
            [str(python), "-c", "import numpy, zmq, pytriton.triton"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_server_environment(),
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{python} cannot import pytriton: {error}"
    if probe.returncode != 0:
        return f"{python} cannot import pytriton: {probe.stderr.strip()[-2000:]}"
    return None


def triton_unavailable_reason() -> str | None:
    """Why Triton cannot serve the tests here, or None: no ``.venv-triton/bin/python``, PyTriton not importable
    there (checked once per interpreter path), or a :func:`start_triton` that already failed in this session."""
    return _interpreter_problem(triton_python()) or (_START_FAILURES[0] if _START_FAILURES else None)


@functools.cache
def weights() -> dict[str, np.ndarray]:
    """``W`` [4, 3], ``b`` [3], ``w`` [4] (float64, read-only): the parameters of serve.py's models, which
    compute in float32 (W and w are exact there; b is rounded to float32) except ``linear64``."""
    stored = json.loads(WEIGHTS_FILE.read_text())
    params = {key: np.array(stored[key], dtype=np.float64) for key in ("W", "b", "w")}
    for array in params.values():
        array.flags.writeable = False
    return params


def linear_logits(x: np.ndarray) -> np.ndarray:
    """``x @ W + b`` in float64: what ``linear`` (and ``linear16``, ``linear64``, ``slow``, ``multi``) compute."""
    return np.asarray(x, dtype=np.float64) @ weights()["W"] + weights()["b"]


def binary_logits(x: np.ndarray) -> np.ndarray:
    """``x @ w`` as one column, in float64: what ``binary`` computes."""
    return (np.asarray(x, dtype=np.float64) @ weights()["w"])[:, None]


def _server_environment() -> dict[str, str]:
    environment = dict(os.environ)
    # The test run's PYTHONPATH (the repository) is no business of the other interpreter.
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        environment.pop(name, None)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``: serve.py, tritonserver, the stubs and their
    helpers, including those left orphaned when their parent died."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class TritonServer:
    """``tests/triton/serve.py`` in its own process group, on 127.0.0.1: ``url`` (HTTP/REST, KServe v2),
    ``http_port``, ``grpc_port``, ``metrics_port``; ``lookup`` (the float32 array the ``lookup`` model serves, or
    None); ``W``, ``b``, ``w`` (see :func:`weights`); ``models`` (the names served); ``log_path``."""

    def __init__(
        self,
        lookup: np.ndarray | None = None,
        *,
        models: tuple[str, ...] | None = None,
        slow_seconds: float = SLOW_SECONDS,
    ):
        self.lookup = None if lookup is None else np.array(lookup, dtype=np.float32, copy=True)
        if self.lookup is not None:
            assert self.lookup.ndim == 2, self.lookup.shape
            self.lookup.flags.writeable = False
        self.models = tuple(models or (*MODELS, *(("lookup",) if lookup is not None else ())))
        self.slow_seconds = slow_seconds
        params = weights()
        self.W, self.b, self.w = params["W"], params["b"], params["w"]
        self.directory = Path(tempfile.mkdtemp(prefix="calibserve-triton-"))
        self.log_path = self.directory / "serve.log"
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.process: subprocess.Popen | None = None
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None
        self._starts = 0
        self._log_offset = 0
        self._debris: set[Path] = set()
        self._scratch_before: set[Path] = set()
        _UNCLOSED.add(self)
        if self.lookup is not None:
            np.save(self.directory / "lookup.npy", self.lookup)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> TritonServer:
        """Start serve.py and wait until Triton and every model are ready. The first start takes free ports
        (other ones, up to three times, if someone binds one meanwhile); later starts reuse them: an upstream
        that comes back at the same address. Raises :class:`TritonStartError` with the log's tail."""
        if self.running:
            raise RuntimeError("already running")
        fresh_ports = self.http_port is None
        for attempt in range(3 if fresh_ports else 1):
            if fresh_ports:
                self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
            began = time.monotonic()
            self._spawn()
            try:
                self._wait_ready(timeout)
            except BaseException as error:
                self.stop(grace=0)
                if not isinstance(error, TritonStartError):
                    raise
                ports = (self.http_port, self.grpc_port, self.metrics_port)
                if not fresh_ports or attempt == 2 or all(port_is_free(port) for port in ports):
                    raise
                continue
            self.last_start_seconds = time.monotonic() - began
            # The Python backend's scratch folder (/tmp/python_env_XXXXXX, empty) is made when the first model
            # loads and named nowhere later: it is ours if it is the only one that appeared meanwhile (another
            # Triton starting at the same time makes it ambiguous; then it is not swept after a kill).
            appeared = set(Path(tempfile.gettempdir()).glob("python_env_*")) - self._scratch_before
            if len(appeared) == 1:
                self._debris.update(appeared)
            return self
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._starts += 1
        self._scratch_before = set(Path(tempfile.gettempdir()).glob("python_env_*"))
        command = [str(triton_python()), str(SERVE_SCRIPT)]
        command += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        command += ["--metrics-port", str(self.metrics_port), "--models", ",".join(self.models)]
        command += ["--slow-seconds", str(self.slow_seconds)]
        command += ["--workspace", str(self.directory / f"workspace-{self._starts}")]
        if self.lookup is not None:
            command += ["--lookup", str(self.directory / "lookup.npy")]
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self._starts}: {' '.join(command)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=_server_environment(),
                start_new_session=True,  # its own process group: stop() kills Triton and the stubs with it
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise TritonStartError(
                        f"serve.py exited with {self.process.returncode}\n{self.log_tail()}"
                    )
                if _FATAL.search(self._current_log()):
                    raise TritonStartError(f"Triton failed to start\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if self._all_ready(client):
                        return
                if time.monotonic() > deadline:
                    raise TritonStartError(f"not ready within {timeout:.0f} s\n{self.log_tail()}")
                time.sleep(0.1)

    def _all_ready(self, client: httpx.Client) -> bool:
        if client.get("/v2/health/ready").status_code != 200:
            return False
        return all(client.get(f"/v2/models/{name}/ready").status_code == 200 for name in self.models)

    def is_ready(self) -> bool:
        try:
            with httpx.Client(base_url=self.url, timeout=2.0) as client:
                return self._all_ready(client)
        except httpx.HTTPError:
            return False

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop serve.py: SIGINT (it unloads the models, then stops Triton), at most ``grace`` seconds for
        Triton and its stubs to exit, then SIGKILL to the whole process group (``grace=0``: at once, a crash).
        Then removes what the group left: its shared memory, Triton's model folders, the workspace. Idempotent."""
        if self.process is None:
            return
        began = time.monotonic()
        pgid = self.process.pid
        self._note_debris(pgid)
        if grace > 0 and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pgid, signal.SIGINT)
            deadline = began + grace
            while time.monotonic() < deadline and self.process.poll() is None and self._triton_alive(pgid):
                time.sleep(0.05)
            self._note_debris(pgid)
        deadline = time.monotonic() + 30
        while members := _group_members(pgid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {members} of group {pgid} survive SIGKILL")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            # reap serve.py (our child); Triton and the stubs are reaped by whoever adopted them
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.05)
        self.process.wait()
        self._sweep(pgid)
        self.process = None
        self.last_stop_seconds = time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL at once, no unloading: an upstream that crashed. Leaves nothing behind either."""
        self.stop(grace=0)

    def close(self, grace: float = STOP_GRACE) -> None:
        """Stop and remove the temporary directory (log, lookup array) too."""
        self.stop(grace)
        shutil.rmtree(self.directory, ignore_errors=True)
        _UNCLOSED.discard(self)

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- leftovers

    def _triton_alive(self, pgid: int) -> bool:
        names = ("tritonserver", "triton_python_backend_stub")
        return any(any(n in arg for n in names) for pid in _group_members(pgid) for arg in _cmdline(pid)[:1])

    def _note_debris(self, pgid: int) -> None:
        """Remember what the group's processes hold that outlives them when killed: shared memory they map
        (PyTriton's psm_*, the Python backend's pytrtion<pid>-*) and the model folder of each stub."""
        for pid in _group_members(pgid):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                    fields = line.split(maxsplit=5)  # address perms offset device inode path
                    path = Path(fields[5]) if len(fields) == 6 else None
                    if path and path.parent == _SHM and path.name.startswith(_SHM_PREFIXES):
                        self._debris.add(path)
            arguments = _cmdline(pid)
            if arguments and arguments[0].endswith("triton_python_backend_stub") and len(arguments) > 1:
                folder = Path(arguments[1]).parent.parent  # <folder>/1/model.py
                if _TEMP_FOLDER.fullmatch(folder.name) and str(folder.parent) == tempfile.gettempdir():
                    self._debris.add(folder)

    def _sweep(self, pgid: int) -> None:
        self._debris.update(_SHM.glob(f"pytrtion{pgid}-*"))
        for path in sorted(self._debris):
            if path.name.startswith("python_env_"):
                with contextlib.suppress(OSError):
                    path.rmdir()  # only while empty, as Triton leaves it
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for workspace in self.directory.glob("workspace-*"):
            shutil.rmtree(workspace, ignore_errors=True)
        self._debris = {path for path in self._debris if path.exists()}  # what leftovers() reports

    def leftovers(self) -> list[str]:
        """What a stopped server still has (nothing, after ``stop()``): live processes of its last process
        group, shared memory and folders it used, a workspace."""
        found = []
        if self.process is not None:
            found += [f"process {pid}: {' '.join(_cmdline(pid))}" for pid in _group_members(self.process.pid)]
        found += [str(path) for path in sorted(self._debris) if path.exists()]
        found += [str(path) for path in self.directory.glob("workspace-*")]
        return found

    # ------------------------------------------------------------------------------------------------- logs

    def _current_log(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._current_log().splitlines()[-lines:])


def start_triton(
    lookup: np.ndarray | None = None,
    *,
    models: tuple[str, ...] | None = None,
    slow_seconds: float = SLOW_SECONDS,
    timeout: float = START_TIMEOUT,
) -> TritonServer:
    """A started :class:`TritonServer` serving ``models`` (default: all of :data:`MODELS`, and ``lookup``
    serving the rows of ``lookup``, a [N, K] array, when given; :data:`ON_REQUEST_MODELS` only when named). Raises :class:`TritonStartError` (with the log's
    tail) if it is not ready within ``timeout`` seconds; the failure is then also what
    :func:`triton_unavailable_reason` answers for the rest of the session."""
    server = TritonServer(lookup, models=models, slow_seconds=slow_seconds)
    try:
        return server.start(timeout)
    except TritonStartError as error:
        server.close()
        _START_FAILURES.append(f"Triton did not start: {error}")
        raise


@atexit.register
def _close_forgotten_servers() -> None:
    for server in list(_UNCLOSED):
        server.close(grace=0)
