"""Upstream inference servers over gRPC (``grpc://host:port``): the Open Inference Protocol as Triton and
KServe serve it on their gRPC port, behind the same calls as the HTTP client of :mod:`service.upstream`.

:class:`GrpcUpstreamClient` is a second client class beside ``UpstreamClient``, not a second proxy: the
proxy (:mod:`service.serving.proxy`) builds and reads V2 documents with binary tensors whichever client
carries them, and this class turns them into ``ModelInferRequest`` messages (every tensor as raw contents)
and the answers back. One ``grpc.aio`` channel per server and worker (HTTP/2: calls share its connection),
made on first use inside the worker's event loop.

Faults map as the HTTP client's do: ``UNAVAILABLE`` (connection refused, server going away) is
:class:`~service.errors.UpstreamUnavailable`; ``DEADLINE_EXCEEDED`` (past ``CALIBSERVE_UPSTREAM_TIMEOUT_S``)
is :class:`~service.errors.UpstreamTimeout`; ``INVALID_ARGUMENT``, ``NOT_FOUND`` and the other refusals of
the caller's request are :class:`~service.errors.UpstreamRejected` (400, 404); anything else is
:class:`~service.errors.UpstreamFailed`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from service import inference_grpc as codec
from service import inference_protocol as wire
from service.errors import (
    InvalidInput,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)

METADATA_TTL_S = 30.0
READY_TTL_S = 1.0
MAX_MESSAGE = 500
# The codes that say the request was the caller's fault, as the HTTP status the proxy reports.
_REJECTED = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400}


class ModelRef(Protocol):
    """What a client needs of an upstream model (``service.upstream.UpstreamSpec`` is one)."""

    model: str
    version: str | None


@dataclass(frozen=True, slots=True)
class ForwardedAnswer:
    """A passed-through answer, as an HTTP body (what the proxy's ``forward`` returns to the codec);
    ``headers`` by lower-case name, as :class:`~service.http_pool.Response`'s."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class GrpcUpstreamClient:
    """One upstream gRPC server: its channel and the protocol's calls, each bounded by ``timeout``."""

    def __init__(self, url: str, *, connect_timeout: float, timeout: float, max_connections: int) -> None:
        self.url = url
        self.target = url.removeprefix("grpc://")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._channel: Any = None
        self._stub: Any = None
        self._metadata: dict[str, tuple[float, Any]] = {}
        self._ready: tuple[float, str | None] | None = None

    def _client(self) -> Any:
        if self._stub is None:
            grpc = codec.require("grpc")
            options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
            self._stub = codec.services().GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def _call(self, rpc: str, request: Any, what: str) -> Any:
        grpc = codec.require("grpc")
        try:
            return await getattr(self._client(), rpc)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            message = (
                f"upstream {self.url} answered {code.name} to {what}: {(exc.details() or '')[:MAX_MESSAGE]}"
            )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise UpstreamTimeout(
                    f"upstream {self.url} did not answer {what} within its time limit"
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise UpstreamUnavailable(message) from None
            if code.name in _REJECTED:
                raise UpstreamRejected(message, upstream_status=_REJECTED[code.name]) from None
            raise UpstreamFailed(message) from None

    # ----------------------------------------------------------------------------------------- infer

    def _request(self, spec: ModelRef, document: Mapping[str, Any], chunks: list[bytes]) -> Any:
        """A ``ModelInferRequest`` of a V2 document and its binary bytes (every input as raw contents)."""
        entries = document.get("inputs")
        if not isinstance(entries, list) or not entries:
            raise InvalidInput("inputs must be a non-empty list of tensors")
        binary = b"".join(chunks)
        request = codec.messages().ModelInferRequest(model_name=spec.model, model_version=spec.version or "")
        if isinstance(document.get("id"), str):
            request.id = document["id"]
        for index, (entry, chunk) in enumerate(
            zip(entries, wire.tensor_chunks(entries, binary, "inputs"), strict=True)
        ):
            array = wire.tensor_array(entry, chunk, f"inputs[{index}]")
            data = codec.set_tensor(
                request.inputs.add(), str(entry.get("name")), entry["datatype"], array, raw=True
            )
            request.raw_input_contents.append(data)
        for item in document.get("outputs") or []:
            request.outputs.add(name=str(item.get("name")))
        return request

    def _answer(self, spec: ModelRef, response: Any) -> tuple[dict, bytes]:
        """A ``ModelInferResponse`` as a V2 document and the binary bytes of its outputs."""
        try:
            raws = codec.raw_contents(response.outputs, response.raw_output_contents, "outputs")
            entries, chunks = [], []
            for tensor, raw in zip(response.outputs, raws, strict=True):
                if raw is not None:  # bytes as they came (any datatype, BYTES included): read where used
                    shape = list(codec.tensor_shape(tensor.shape, f"output {tensor.name!r}"))
                    entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
                    entry["parameters"] = {"binary_data_size": len(raw)}
                    chunk = raw
                else:
                    array = codec.tensor_array(tensor, None, f"output {tensor.name!r}")
                    entry, chunk = wire.binary_entry(tensor.name, array)
                entries.append(entry)
                chunks.append(chunk)
        except InvalidInput as exc:
            raise UpstreamFailed(f"upstream {self.url}, model {spec.model!r}: {exc}") from None
        document: dict[str, Any] = {"model_name": response.model_name, "outputs": entries}
        if response.model_version:
            document["model_version"] = response.model_version
        if response.id:
            document["id"] = response.id
        return document, b"".join(chunks)

    async def infer(
        self, spec: ModelRef, document: Mapping[str, Any], chunks: list[bytes]
    ) -> tuple[dict, bytes]:
        """One inference call: ``(the answer as a V2 document, the binary bytes after it)``."""
        request = self._request(spec, document, chunks)
        response = await self._call("ModelInfer", request, f"infer of model {spec.model!r}")
        return self._answer(spec, response)

    async def forward(self, spec: ModelRef, body: bytes, headers: Mapping[str, str]) -> ForwardedAnswer:
        """An HTTP inference request passed through: sent as gRPC (its JSON or binary inputs as raw
        contents), answered as the HTTP body it stands for (outputs binary)."""
        try:
            document, binary = wire.split_body(body, headers.get(wire.HEADER_LENGTH))
        except InvalidInput as exc:
            raise UpstreamRejected(str(exc), upstream_status=400) from None
        answer, answer_binary = await self.infer(spec, document, [bytes(binary)] if binary else [])
        content, header_length = wire.encode(answer, [answer_binary] if answer_binary else [])
        response_headers = {"content-type": "application/json"}
        if header_length is not None:
            response_headers = {
                "content-type": "application/octet-stream",
                wire.HEADER_LENGTH.lower(): str(header_length),
            }
        return ForwardedAnswer(200, response_headers, content)

    # ------------------------------------------------------------------------------ metadata, readiness

    async def model_metadata(self, spec: ModelRef) -> dict[str, Any]:
        """The model's V2 metadata (``inputs``, ``outputs``, ...), cached for :data:`METADATA_TTL_S`."""
        key = f"metadata/{spec.model}/{spec.version or ''}"
        cached = self._metadata.get(key)
        if cached is not None and time.monotonic() - cached[0] < METADATA_TTL_S:
            return cached[1]
        request = codec.messages().ModelMetadataRequest(name=spec.model, version=spec.version or "")
        response = await self._call("ModelMetadata", request, f"the metadata of model {spec.model!r}")

        def tensors(items: Any) -> list[dict[str, Any]]:
            return [
                {"name": item.name, "datatype": item.datatype, "shape": list(item.shape)} for item in items
            ]

        document = {
            "name": response.name,
            "versions": list(response.versions),
            "platform": response.platform,
            "inputs": tensors(response.inputs),
            "outputs": tensors(response.outputs),
        }
        self._metadata[key] = (time.monotonic(), document)
        return document

    async def max_batch_size(self, spec: ModelRef) -> int | None:
        """Triton's ``max_batch_size`` of the model (its ``ModelConfig`` RPC), None where unknown or 0."""
        key = f"config/{spec.model}"
        cached = self._metadata.get(key)
        if cached is not None and time.monotonic() - cached[0] < METADATA_TTL_S:
            return cached[1]
        request = codec.messages().ModelConfigRequest(name=spec.model, version=spec.version or "")
        try:
            response = await self._call("ModelConfig", request, f"the config of model {spec.model!r}")
            size = response.config.max_batch_size or None
        except (UpstreamFailed, UpstreamRejected, UpstreamTimeout):
            size = None
        self._metadata[key] = (time.monotonic(), size)
        return size

    async def not_ready(self, spec: ModelRef | None = None) -> str | None:
        """None when the server (or its model ``spec``) is ready, else why not; the server's answer cached
        for :data:`READY_TTL_S`."""
        if spec is None and self._ready is not None and time.monotonic() - self._ready[0] < READY_TTL_S:
            return self._ready[1]
        messages = codec.messages()
        try:
            if spec is None:
                ready = (await self._call("ServerReady", messages.ServerReadyRequest(), "ServerReady")).ready
                reason = None if ready else f"upstream {self.url} says it is not ready"
            else:
                request = messages.ModelReadyRequest(name=spec.model, version=spec.version or "")
                ready = (await self._call("ModelReady", request, f"ModelReady of {spec.model!r}")).ready
                reason = None if ready else f"upstream {self.url} says model {spec.model!r} is not ready"
        except (UpstreamFailed, UpstreamTimeout, UpstreamUnavailable, UpstreamRejected) as exc:
            reason = str(exc)
        if spec is None:
            self._ready = (time.monotonic(), reason)
        return reason

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await asyncio.shield(channel.close())
