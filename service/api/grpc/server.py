"""The gRPC server of one worker: started with the app (its lifespan), stopped with it.

Every uvicorn worker runs its own ``grpc.aio`` server on the same port: grpc binds with ``SO_REUSEPORT``
(``grpc.so_reuseport``, set explicitly here), so the kernel spreads new connections over the workers as it
does for the HTTP listeners (:mod:`service.api.server`). gRPC keeps a connection for many calls, so the
balance is per connection, not per call: a client that opens one channel talks to one worker, as it would to
one of several replicas. The supervisor claims the port first (:func:`service.api.server.claim_port`), so a
second calibserve, or any other listener, cannot silently share it.

Limits: a message larger than ``CALIBSERVE_MAX_BODY_BYTES`` is refused by grpc before it is decoded, and more
than ``CALIBSERVE_MAX_CONCURRENCY`` RPCs in flight in a worker are refused: both ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import logging

import grpc

from service import inference_grpc as codec
from service.api.grpc.servicer import InferenceServicer
from service.config import Settings
from service.errors import CalibserveError
from service.serving.dataplane import DataPlane

logger = logging.getLogger("calibserve.grpc")
STOP_GRACE_S = 5.0


class GrpcPortUnavailable(CalibserveError):
    """grpc could not bind the configured port."""


async def start_grpc_server(
    plane: DataPlane, settings: Settings, *, latency_models: frozenset[str] = frozenset()
) -> grpc.aio.Server:
    """A started ``grpc.aio`` server on ``settings.host:settings.grpc_port`` answering the Open Inference
    Protocol from ``plane``; GrpcPortUnavailable when it cannot bind."""
    options = [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.max_concurrency)
    servicer = InferenceServicer(plane, settings, latency_models=latency_models)
    codec.services().add_GRPCInferenceServiceServicer_to_server(servicer, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcPortUnavailable(f"cannot serve gRPC on {address}: {exc}") from None
    await server.start()
    logger.info("serving the Open Inference Protocol over gRPC on %s:%d", settings.host, port)
    return server


async def stop_grpc_server(server: grpc.aio.Server) -> None:
    """Stop taking calls; calls in flight get :data:`STOP_GRACE_S` seconds to finish."""
    await server.stop(STOP_GRACE_S)
