"""Running the app under uvicorn: one or several workers sharing one store.

The event loop and HTTP parser are chosen explicitly: uvloop and httptools (``uvicorn[standard]``) when
installed, which roughly doubles the requests/s of asyncio + h11 on small requests. With several workers
they matter beyond speed: under the asyncio loop, the sockets a worker accepts from uvicorn's shared
listener lose ``TCP_NODELAY`` (Kludex/uvicorn#3149), and small answers then wait for Nagle's algorithm
(40 ms each); uvloop sets ``TCP_NODELAY`` on every accepted TCP socket. ``tests/test_server_sockets.py``
checks the option on the accepted sockets of a two-worker server.

Several workers also get one listening socket each (``SO_REUSEPORT``) instead of uvicorn's one shared
listener: with a shared listener, a burst of new keep-alive connections is often accepted by whichever
worker is awake, all of them by one worker (32 of 32 in a test here), which then serves them all for as long
as they live; with a listener per worker the kernel spreads connections by their address hash. uvicorn's
supervisor (restarts, signals) is kept: it passes its socket to each worker it spawns by pickling it, and
the socket given to it (:class:`PerWorkerListener`) reserves the port in the supervisor and unpickles as a
new ``SO_REUSEPORT`` listener in each worker. A worker that dies drops the connections still queued on
its own listener (the shared listener kept them for the others): the price of the balance.

``SO_REUSEPORT`` would also let a second server of the same user join the port and split the traffic
between two stores. Before binding, :func:`claim_port` takes a lock file per address (another calibserve
holds it) and binds a probe without ``SO_REUSEPORT`` (any other listener holds the port): either refuses
to start, naming the port.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import shutil
import socket
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service.config import Settings, get_settings
from service.errors import CalibserveError

logger = logging.getLogger("calibserve.server")


def app_factory() -> FastAPI:
    """The uvicorn factory each worker calls: settings come from the ``CALIBSERVE_*`` environment.

    The objects made by importing torch, scipy and the app (some 250k) are moved out of the garbage
    collector's reach with :func:`gc.freeze`: a full collection over them takes about 100 ms here, and
    would stall every request in flight whenever it ran.
    """
    from service.api.app import create_app

    app = create_app(get_settings())
    gc.collect()
    gc.freeze()
    return app


def settings_environment(settings: Settings) -> dict[str, str]:
    """The settings as ``CALIBSERVE_*`` variables, so worker processes build the same ``Settings``."""
    env = {}
    for key, value in settings.model_dump().items():
        if value is not None:
            env[f"CALIBSERVE_{key.upper()}"] = str(value)
    return env


def loop_and_parser() -> tuple[str, str]:
    """uvicorn's ``loop`` and ``http``: uvloop and httptools when installed, else asyncio and h11."""
    loop = "uvloop" if find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if find_spec("httptools") is not None else "h11"
    if loop == "asyncio":
        logger.warning("uvloop is not installed: with several workers, accepted sockets may lack TCP_NODELAY")
    return loop, http


def http_protocol(http: str) -> str | type:
    """uvicorn's ``http``: the guarded httptools protocol (:mod:`service.api.connections`), or h11."""
    if http != "httptools":
        logger.warning(
            "httptools is not installed: header time, body rate and connection guards are off "
            "(only CALIBSERVE_MAX_HEADER_BYTES and CALIBSERVE_MAX_CONNECTIONS apply, through h11)"
        )
        return http
    from service.api.connections import GuardedHttpToolsProtocol

    return GuardedHttpToolsProtocol


def reuse_port_socket(family: int, address: tuple[Any, ...]) -> socket.socket:
    """A TCP socket bound to ``address`` with ``SO_REUSEADDR`` and ``SO_REUSEPORT``."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def worker_listener(family: int, address: tuple[Any, ...], backlog: int) -> socket.socket:
    """What a :class:`PerWorkerListener` becomes in a worker: its own listener on the shared address."""
    sock = reuse_port_socket(family, address)
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class PerWorkerListener(socket.socket):
    """Bound (not listening) in the supervisor, which reserves the port; one listener per worker.

    uvicorn hands the supervisor's sockets to each worker by pickling them (workers are spawned); this
    socket pickles as a call to :func:`worker_listener`, so each worker listens on a socket of its own.
    """

    backlog = 2048

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return worker_listener, (int(self.family), self.getsockname(), self.backlog)

    @classmethod
    def bind_to(cls, host: str, port: int, backlog: int) -> PerWorkerListener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = cls(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.backlog = backlog
        return sock


class PortInUse(CalibserveError):
    """The address is served by another process: starting would split requests between two services."""


def claim_port(host: str, port: int) -> int | None:
    """Refuse an address another process serves; the open lock file to hold while serving (None: port 0).

    The lock file (``<tmp>/calibserve-<host>-<port>.lock``, ``flock`` ed) stops a second calibserve even
    while both start at once; the probe (bound without ``SO_REUSEPORT``) stops any other listener.
    """
    if port == 0:
        return None
    lock_path = Path(tempfile.gettempdir()) / f"calibserve-{host.replace(':', '_')}-{port}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PortInUse(f"{host}:{port} is already served by another calibserve (lock {lock_path})") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{host}:{port} is already in use by another process") from None
            raise
    return fd


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; refuses a non-local bind without keys (``check_bind_is_safe``)."""

    settings.check_bind_is_safe()
    lock = claim_port(settings.host, settings.port)
    # The workers' gRPC servers share their port with SO_REUSEPORT: claimed here so nothing else can.
    grpc_lock = claim_port(settings.host, settings.grpc_port) if settings.grpc_port else None
    os.environ.update(settings_environment(settings))
    get_settings.cache_clear()
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="calibserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run(settings)
    finally:
        if metrics_dir is not None:  # the workers' metric files die with the server
            shutil.rmtree(metrics_dir, ignore_errors=True)
        for held in (lock, grpc_lock):
            if held is not None:
                os.close(held)


def _run(settings: Settings) -> None:
    import uvicorn

    loop, http = loop_and_parser()
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "loop": loop,
        "http": http_protocol(http),
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 30,
        # A worker answers the supervisor's health pings only once torch and the app are imported, which
        # takes longer than uvicorn's default 5 s on a busy small machine: it was killed and respawned.
        "timeout_worker_healthcheck": 60,
    }
    if http == "h11":  # h11 bounds an unfinished head itself; the other guards need httptools
        options["h11_max_incomplete_event_size"] = settings.max_header_bytes
        options["limit_concurrency"] = settings.max_connections
    if settings.workers == 1 or not hasattr(socket, "SO_REUSEPORT"):
        uvicorn.run("service.api.server:app_factory", **options)
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("service.api.server:app_factory", **options)
    listener = PerWorkerListener.bind_to(settings.host, settings.port, config.backlog)
    logger.info(
        "serving on %s:%d with %d workers, one SO_REUSEPORT listener each",
        settings.host,
        listener.getsockname()[1],
        settings.workers,
    )
    try:
        Multiprocess(config, sockets=[listener]).run()
    finally:
        listener.close()
