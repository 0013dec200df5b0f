"""Real server processes for end-to-end tests: `python -m service serve` on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers.data import REPO, SHIPPED_MODELS
from tests.helpers.ports import free_port, port_is_free

__all__ = ["Server", "free_port", "port_is_free"]


class Server:
    """A `calibserve serve` process; `stop()` sends SIGTERM (or SIGKILL) and waits. With ``grpc`` it also
    serves the Open Inference Protocol over gRPC, at ``grpc_target`` (``127.0.0.1:<port>``)."""

    def __init__(
        self,
        store: Path,
        *,
        models: Path | None = None,
        workers: int = 1,
        env: dict | None = None,
        wait_loaded: bool = True,
        grpc: bool = False,
    ):
        environment = {**os.environ, "CALIBSERVE_LOG_LEVEL": "warning", **(env or {})}
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # A free port is only free until someone else binds it (other test processes share the machine): if
        # the server exits because its port was taken in between, start it again on another one.
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            command = [sys.executable, "-m", "service", "serve", "--port", str(self.port)]
            command += ["--store-dir", str(store), "--models-dir", str(models or SHIPPED_MODELS)]
            command += ["--workers", str(workers)]
            self.grpc_port = free_port() if grpc else None
            self.grpc_target = f"127.0.0.1:{self.grpc_port}" if grpc else None
            if grpc:
                command += ["--grpc-port", str(self.grpc_port)]
            self.process = subprocess.Popen(command, env=environment, cwd=REPO, start_new_session=True)
            try:
                self.wait_ready(loaded=wait_loaded)
                return
            except RuntimeError:
                ports = [self.port] if self.grpc_port is None else [self.port, self.grpc_port]
                if attempt == 2 or self.process.poll() is None or all(map(port_is_free, ports)):
                    raise

    def wait_ready(self, timeout: float = 60.0, *, loaded: bool = True) -> None:
        """Wait for /readyz to answer 200 and, with ``loaded``, to list no pending (still loading) models."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                response = httpx.get(self.url + "/readyz", timeout=1.0)
                if response.status_code == 200 and not (loaded and response.json().get("pending_models")):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
