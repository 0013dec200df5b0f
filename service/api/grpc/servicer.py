"""``inference.GRPCInferenceService`` over the data plane: each RPC decodes its message, calls one function of
:mod:`service.serving.open_inference` and encodes the answer, as ``routers/oip.py`` does for HTTP.

RPCs: ``ServerLive``, ``ServerReady``, ``ServerMetadata`` (open, like ``/v2/health/*``), ``ModelReady``,
``ModelMetadata``, ``ModelInfer`` and ``ModelStreamInfer`` (the ``read`` role: an API key in metadata
``x-api-key`` or ``authorization: Bearer <key>``). The others of Triton's service (repository, statistics,
shared memory, trace, logging) answer ``UNIMPLEMENTED``.

``ModelInfer`` takes the inputs of the HTTP route (one tensor ``logits``, ``probabilities`` or ``inputs``;
FP32, FP64 or FP16) as typed ``contents`` or ``raw_input_contents``, and answers its outputs in the same form
(FP16 only raw: it has no typed contents). ``model_version`` pins a calibrator version; the answer's
``model_version`` is the version that answered, and ``parameters`` hold ``calibrator_version`` and, with the
prediction log on, ``prediction_ids`` (comma-separated: gRPC parameters are scalars). A model served by an
upstream takes whatever inputs the upstream takes; they are forwarded, and its outputs come back with
``probabilities`` and ``predicted_class`` as on HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from service import inference_grpc as codec
from service import inference_protocol as wire
from service.api.auth import authorize, presented_key
from service.api.errors import status_of
from service.api.grpc.status import code_of
from service.api.observability import LATENCY, MODEL_LATENCY, REQUESTS
from service.config import Settings
from service.errors import CalibserveError, InvalidInput, UpstreamFailed
from service.names import parse_version, validate_model_name
from service.serving import open_inference as v2
from service.serving.dataplane import DataPlane
from service.serving.proxy import PassedThrough
from service.serving.state import ActiveCalibrator, ModelInfo

logger = logging.getLogger("calibserve.grpc")

pb = codec.messages()
METHOD = "GRPC"  # the request metrics' method label of every RPC


def _version(text: str) -> int | None:
    return parse_version(text or None, field="model version")


def _requested(request: Any) -> list[str] | None:
    """The names of the requested outputs (None when none is named)."""
    names = []
    for output in request.outputs:
        if "classification" in output.parameters and codec.parameter_value(
            output.parameters["classification"]
        ):
            raise InvalidInput("the classification extension is not supported; ask for predicted_class")
        names.append(output.name)
    return names or None


class InferenceServicer(codec.services().GRPCInferenceServiceServicer):
    """The RPCs of the Open Inference Protocol, answered from this worker's data plane."""

    def __init__(self, plane: DataPlane, settings: Settings, *, latency_models: frozenset[str]) -> None:
        self.plane = plane
        self.settings = settings
        self.latency_models = latency_models

    # --------------------------------------------------------------------------------- every RPC

    async def _answer(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        role: str | None,
        handle: Callable[[], Awaitable[tuple[Any, str]]],
    ) -> Any:
        """Authorize, run ``handle`` (the answer and its model's name), map a domain error to its status
        (:mod:`service.api.grpc.status`), and count the RPC in the request metrics."""
        start = time.perf_counter()
        status, model = 200, ""
        try:
            if role is not None:
                self._authorize(context, role)
            response, model = await handle()
            return response
        except CalibserveError as exc:
            status = status_of(exc)[0]
            await context.abort(code_of(exc), str(exc))
        except Exception:
            status = 500
            logger.exception("gRPC %s failed", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by calibserve)")
        finally:
            self._count(rpc, model, status, time.perf_counter() - start)

    def _authorize(self, context: grpc.aio.ServicerContext, role: str) -> None:
        metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
        authorize(self.settings, presented_key(metadata.get), role)

    def _count(self, rpc: str, model: str, status: int, elapsed: float) -> None:
        route = f"/{codec.SERVICE}/{rpc}"
        REQUESTS.labels(METHOD, route, model if status < 400 else "", str(status)).inc()
        LATENCY.labels(METHOD, route).observe(elapsed)
        if model and status < 400 and model in self.latency_models:
            MODEL_LATENCY.labels(METHOD, route, model).observe(elapsed)

    # --------------------------------------------------------------------------------- health, metadata

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> tuple[Any, str]:
            return pb.ServerLiveResponse(live=True), ""

        return await self._answer("ServerLive", context, None, handle)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> tuple[Any, str]:
            return pb.ServerReadyResponse(ready=await v2.server_not_ready(self.plane) is None), ""

        return await self._answer("ServerReady", context, None, handle)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> tuple[Any, str]:
            return pb.ServerMetadataResponse(**v2.server_metadata()), ""

        return await self._answer("ServerMetadata", context, None, handle)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> tuple[Any, str]:
            name = validate_model_name(request.name)
            reason = await v2.model_not_ready(self.plane, name, _version(request.version))
            return pb.ModelReadyResponse(ready=reason is None), name

        return await self._answer("ModelReady", context, "read", handle)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> tuple[Any, str]:
            name = validate_model_name(request.name)
            document = await v2.model_metadata(self.plane, name, _version(request.version))
            response = pb.ModelMetadataResponse(
                name=document["name"], versions=document["versions"], platform=document["platform"]
            )
            for tensors, entries in (
                (response.inputs, document["inputs"]),
                (response.outputs, document["outputs"]),
            ):
                for entry in entries:
                    shape = [size for size in entry.get("shape") or [] if isinstance(size, int)]
                    tensors.add(name=str(entry.get("name")), datatype=str(entry.get("datatype")), shape=shape)
            return response, name

        return await self._answer("ModelMetadata", context, "read", handle)

    # ----------------------------------------------------------------------------------------- infer

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer("ModelInfer", context, "read", lambda: self._infer_any(request))

    async def ModelStreamInfer(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's streaming inference: each request of the stream answered in order, as ModelInfer would.
        The key is checked once, for the stream (a wrong one ends it with its status); an error of one
        request is that answer's ``error_message`` (its ``id`` kept), and the stream goes on."""
        try:
            self._authorize(context, "read")
        except CalibserveError as exc:
            self._count("ModelStreamInfer", "", status_of(exc)[0], 0.0)
            await context.abort(code_of(exc), str(exc))
        async for request in requests:
            start = time.perf_counter()
            status, model = 200, ""
            try:
                response, model = await self._infer_any(request)
                yield pb.ModelStreamInferResponse(infer_response=response)
            except CalibserveError as exc:
                status = status_of(exc)[0]
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                yield pb.ModelStreamInferResponse(error_message=str(exc), infer_response=failed)
            except Exception:
                status = 500
                logger.exception("gRPC ModelStreamInfer failed")
                yield pb.ModelStreamInferResponse(error_message="internal error (logged by calibserve)")
            finally:
                self._count("ModelStreamInfer", model, status, time.perf_counter() - start)

    async def _infer_any(self, request: Any) -> tuple[Any, str]:
        """One inference request, of a model calibserve runs or of an upstream model: (answer, model)."""
        name = validate_model_name(request.model_name)
        version = _version(request.model_version)
        self.plane.require_ready()
        upstream = self.plane.upstream_model(name, version)
        if upstream is not None:
            return await self._infer_upstream(request, *upstream), name
        return await self._infer(request, name, version), name

    async def _infer(self, request: Any, name: str, version: int | None) -> Any:
        if len(request.inputs) != 1:
            raise InvalidInput(f"inputs must be exactly one tensor named {', '.join(v2.INPUT_NAMES)}")
        tensor = request.inputs[0]
        input_name = v2.input_name(tensor.name)
        v2.input_dtype(input_name, tensor.datatype)
        (raw,) = codec.raw_contents(request.inputs, request.raw_input_contents, "inputs")
        # a copy: the calibrators may work in place, and the message's bytes are read-only
        values = np.array(codec.tensor_array(tensor, raw, f"input {input_name!r}"))
        v2.check_input_shape(input_name, values)
        requested = _requested(request)
        seed = codec.parameter_value(request.parameters["seed"]) if "seed" in request.parameters else None
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidInput(f"parameters.seed must be an integer >= 0, got {seed!r}")
        result = await v2.infer(
            self.plane,
            name,
            version,
            input_name=input_name,
            values=values,
            datatype=tensor.datatype,
            outputs=None if requested is None else [v2.output_name(output) for output in requested],
            seed=seed,
        )
        response = self._response(request, name, result.calibrator_version, result.prediction_ids)
        if result.alpha is not None:
            codec.set_parameter(response.parameters, "alpha", float(result.alpha))
        as_raw = raw is not None  # outputs in the form of the input
        for output, (datatype, array) in result.outputs.items():
            data = codec.set_tensor(response.outputs.add(), output, datatype, array, raw=as_raw)
            if data is not None:
                response.raw_output_contents.append(data)
        return response

    def _response(
        self, request: Any, name: str, version: int | None, prediction_ids: list[str] | None
    ) -> Any:
        response = pb.ModelInferResponse(model_name=name, id=request.id)
        if version is not None:
            response.model_version = str(version)
            codec.set_parameter(response.parameters, "calibrator_version", version)
        if prediction_ids is not None:
            codec.set_parameter(response.parameters, "prediction_ids", prediction_ids)
        return response

    async def _infer_upstream(self, request: Any, info: ModelInfo, entry: ActiveCalibrator) -> Any:
        """The request as a V2 document with binary inputs (what the proxy forwards), its answer back as
        gRPC: calibserve's outputs from the data plane, the upstream's others as they came; outputs are
        raw (as Triton answers), whatever form the inputs took."""
        raws = codec.raw_contents(request.inputs, request.raw_input_contents, "inputs")
        entries, chunks = [], []
        for tensor, raw in zip(request.inputs, raws, strict=True):
            array = codec.tensor_array(tensor, raw, f"input {tensor.name!r}")
            tensor_entry, chunk = wire.binary_entry(tensor.name, array)
            entries.append(tensor_entry)
            chunks.append(chunk)
        if not entries:
            raise InvalidInput("inputs must be a non-empty list of tensors")
        wanted = _requested(request)
        document: dict[str, Any] = {"inputs": entries}
        if wanted is not None:
            document["outputs"] = [{"name": output, "parameters": {"binary_data": True}} for output in wanted]
        if (
            "seed" in request.parameters
        ):  # of randomised prediction sets: the data plane reads it, never forwarded
            document["parameters"] = {"seed": codec.parameter_value(request.parameters["seed"])}
        body, header_length = wire.encode(document, chunks)
        headers = {"content-type": "application/octet-stream", wire.HEADER_LENGTH: str(header_length)}
        binary = memoryview(body)[header_length:]
        result = await self.plane.infer_upstream(info, entry, document, binary, (body, headers))
        if isinstance(result, PassedThrough):
            return self._passed_through(request, info.name, result)
        ids = result.ids.as_list() if result.ids is not None else None
        response = self._response(request, info.name, result.calibrator_version, ids)
        upstream_version = result.answer.document.get("model_version")
        if upstream_version is not None:
            codec.set_parameter(response.parameters, "upstream_model_version", upstream_version)
        if result.alpha is not None:
            codec.set_parameter(response.parameters, "alpha", float(result.alpha))
        for output, own in v2.upstream_outputs(result, wanted):
            if own is None:
                _upstream_output(response, *result.answer.outputs[output])
            else:
                response.raw_output_contents.append(
                    codec.set_tensor(response.outputs.add(), output, own[0], own[1], raw=True)
                )
        return response

    def _passed_through(self, request: Any, name: str, result: PassedThrough) -> Any:
        """An upstream's answer that passed through unchanged (no calibrator yet), as gRPC."""
        try:
            document, binary = wire.split_body(
                result.body, result.headers.get(wire.HEADER_LENGTH.lower()), "the upstream answer"
            )
            entries = document.get("outputs") or []
            chunks = wire.tensor_chunks(entries, binary, "upstream outputs")
        except InvalidInput as exc:  # the upstream's fault, not the caller's
            raise UpstreamFailed(str(exc)) from None
        response = pb.ModelInferResponse(model_name=name, id=request.id)
        for output_entry, chunk in zip(entries, chunks, strict=True):
            _upstream_output(response, output_entry, chunk)
        return response


def _upstream_output(response: Any, entry: dict[str, Any], chunk: bytes | None) -> None:
    """An output as the upstream wrote it, added to a gRPC answer as raw contents: its binary bytes as they
    came (any datatype, BYTES included), or its JSON numbers encoded."""
    name, datatype = str(entry.get("name")), str(entry.get("datatype"))
    try:
        if chunk is not None:
            tensor = response.outputs.add(name=name, datatype=datatype)
            tensor.shape.extend(codec.tensor_shape(entry.get("shape") or [], f"upstream output {name!r}"))
            response.raw_output_contents.append(bytes(chunk))
            return
        array = wire.tensor_array(entry, None, f"upstream output {name!r}")
    except (InvalidInput, TypeError, ValueError) as exc:
        raise UpstreamFailed(f"upstream output {name!r}: {exc}") from None
    response.raw_output_contents.append(
        codec.set_tensor(response.outputs.add(), name, datatype, array, raw=True)
    )
