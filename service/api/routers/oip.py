"""The Open Inference Protocol (KServe V2 / Triton HTTP), so inference-server clients can call calibserve.

Routes (``{version}`` is a calibrator version; without it the active calibrator answers):

- ``GET /v2``: server metadata (``name``, ``version``, ``extensions``); ``GET /v2/health/live`` and
  ``/v2/health/ready``: ``{"live": true}`` / ``{"ready": true}``, 503 while not ready. These three are open
  like ``/healthz``; every other route needs the ``read`` role (``X-API-Key`` or ``Authorization: Bearer``).
- ``GET /v2/models/{name}[/versions/{version}]``: model metadata: ``versions`` (calibrator versions, newest
  first, at most 100), ``platform`` (``calibserve_logits`` or ``calibserve_torchscript``), ``inputs`` and
  ``outputs`` with datatype and shape (``-1`` where free).
- ``GET /v2/models/{name}[/versions/{version}]/ready``: ``{"name", "ready"}``; 503 for a TorchScript model
  that is failing, 404 for an unknown model or version.
- ``POST /v2/models/{name}[/versions/{version}]/infer``: one input tensor named ``logits`` or
  ``probabilities`` (any model) or ``inputs`` (TorchScript models), 2-D ``[N, K]`` (``inputs``: ``[N,
  ...]``), datatype ``FP32``, ``FP64`` or ``FP16``, with ``data`` flat (row-major) or nested, or in binary
  form. Outputs ``probabilities`` (the default), and on request ``logits`` (what the calibrator received:
  the model's logits for ``inputs``) and ``predicted_class`` (``INT64``). Output data are ``FP64`` when the
  input was ``FP64``, else ``FP32``. The request ``id`` is echoed; ``model_version`` is the calibrator
  version that answered (absent when none is active); ``parameters.calibrator_version`` says the same.

Binary tensor data extension (Triton's, which ``tritonclient`` uses): the request body is the JSON header
followed by the input bytes, the header's length in ``Inference-Header-Content-Length``, and the input's
``parameters.binary_data_size`` its byte count (little-endian, row-major). Outputs come back binary when
their ``parameters.binary_data`` is true, or when the request's ``parameters.binary_data_output`` is true
and the output does not say otherwise; the answer is then ``application/octet-stream`` with its JSON
header's length in ``Inference-Header-Content-Length`` and each binary output's
``parameters.binary_data_size``.

Errors are ``{"error": "<message>"}`` (``application/json``), written by the one exception handler
(:mod:`service.api.errors`) with the status of the same error on the v1 routes, except that a malformed
request is always 400 here (422 there): 400 bad request or tensor, 401/403 auth, 404 unknown model or
version, 413 body too large, 502 a failing TorchScript model, 503 not ready or overloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service import inference_protocol as wire
from service.api.auth import ReadAccess
from service.api.bodies import LeanRequest, LeanRoute, authorize
from service.api.deps import ModelName, Plane, Version
from service.api.routers import fallback
from service.api.tensors import JSON, RAW, body_type, check_shape
from service.errors import InvalidInput
from service.names import parse_version, validate_model_name
from service.serving import open_inference as v2
from service.serving.dataplane import DataPlane
from service.serving.proxy import PassedThrough
from service.serving.state import ActiveCalibrator, ModelInfo

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

HEADER_LENGTH = wire.HEADER_LENGTH
# The protocol's rules (inputs, outputs, datatypes) are the data plane's, shared with the gRPC codec.
DATATYPES = v2.DATATYPES
INPUT_NAMES = v2.INPUT_NAMES
OUTPUT_NAMES = v2.OUTPUT_NAMES


def json_response(content: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json"
    )


# ----------------------------------------------------------------------------------------------- parsing


@dataclass
class InferRequest:
    id: str | None
    input_name: str
    values: np.ndarray
    datatype: str
    outputs: list[tuple[str, bool]] = field(default_factory=list)
    named_outputs: bool = True  # False: the request named none (the defaults, prediction sets included)
    seed: int | None = None  # parameters.seed: of randomised prediction sets


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be true or false, got {value!r}")
    return value


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers, got {value!r}")
    return check_shape(value, f"input {name!r} shape")


def _tensor_from_json(data: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: data must be a list of numbers (flat or nested)")
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"input {name!r}: nested data must be rectangular") from None
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"input {name!r}: data must hold numbers only")
    if array.size != math.prod(shape):
        raise InvalidInput(
            f"input {name!r}: data has {array.size} elements; shape {list(shape)} needs {math.prod(shape)}",
        )
    with np.errstate(over="ignore"):
        return array.astype(dtype).reshape(shape)


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """Read an inference request, JSON or JSON header plus binary tensor data."""
    request, binary = wire.split_body(body, header_length)
    return parse_infer_document(request, binary)


def parse_infer_document(request: dict[str, Any], binary: bytes) -> InferRequest:
    """Read the inference request of a model calibserve runs itself (one tensor it knows)."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidInput(f"inputs must be a list of exactly one tensor named {', '.join(INPUT_NAMES)}")
    tensor = _object(inputs[0], "inputs[0]")
    name = v2.input_name(tensor.get("name"))
    shape = _shape(tensor.get("shape"), name)
    datatype = tensor.get("datatype")
    dtype = v2.input_dtype(name, datatype)
    parameters = _object(tensor.get("parameters") or {}, f"input {name!r} parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
        if "data" in tensor:
            raise InvalidInput(f"input {name!r}: give data or binary_data_size, not both")
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise InvalidInput(
                f"input {name!r}: binary_data_size is {size}; shape {list(shape)} of {datatype} needs {expected}",
            )
        if len(binary) != size:
            raise InvalidInput(
                f"input {name!r}: binary_data_size is {size} but the body holds {len(binary)} bytes after "
                "the JSON header",
            )
        values = np.frombuffer(binary, dtype=dtype).reshape(shape).copy()
    else:
        if binary:
            raise InvalidInput("binary data follows the JSON header but no input has binary_data_size")
        if "data" not in tensor:
            raise InvalidInput(f"input {name!r}: data (or parameters.binary_data_size) is required")
        values = _tensor_from_json(tensor["data"], name, shape, dtype)
    v2.check_input_shape(name, values)

    request_parameters = _object(request.get("parameters") or {}, "parameters")
    binary_default = _flag(request_parameters.get("binary_data_output", False), "binary_data_output")
    outputs: list[tuple[str, bool]] = []
    requested = request.get("outputs")
    if requested is None:
        outputs.append(("probabilities", binary_default))
    else:
        if not isinstance(requested, list) or not requested:
            raise InvalidInput("outputs must be a non-empty list of {name, parameters}")
        for index, item in enumerate(requested):
            item = _object(item, f"outputs[{index}]")
            output_name = v2.output_name(item.get("name"))
            output_parameters = _object(item.get("parameters") or {}, f"output {output_name!r} parameters")
            if output_parameters.get("classification"):
                raise InvalidInput("the classification extension is not supported; ask for predicted_class")
            wanted_binary = output_parameters.get("binary_data", binary_default)
            outputs.append((output_name, _flag(wanted_binary, f"output {output_name!r} binary_data")))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"id must be a string, got {request_id!r}")
    seed = request_parameters.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidInput(f"parameters.seed must be an integer >= 0, got {seed!r}")
    return InferRequest(request_id, name, values, datatype, outputs, requested is not None, seed)


# ------------------------------------------------------------------------------------------------ infer


def _own_output(
    name: str, array: np.ndarray, datatype: str, binary: bool
) -> tuple[dict[str, Any], bytes | None]:
    return wire.tensor_entry(name, np.asarray(array, dtype=wire.NUMPY_TYPES[datatype]), binary=binary)


def answer(
    name: str,
    request_id: Any,
    version: int | None,
    outputs: list[tuple[dict[str, Any], bytes | None]],
    parameters: dict[str, Any] | None = None,
) -> Response:
    """An inference answer: JSON, or (any binary output) its JSON header followed by the outputs' bytes."""
    document: dict[str, Any] = {"model_name": name}
    if version is not None:
        document["model_version"] = str(version)
    if request_id is not None:
        document["id"] = request_id
    document["parameters"] = {"calibrator_version": version, **(parameters or {})}
    document["outputs"] = [entry for entry, _ in outputs]
    parts, header_length = wire.encode_parts(document, [chunk for _, chunk in outputs if chunk is not None])
    if header_length is None:
        return Response(parts[0], media_type="application/json")
    return PartsResponse(
        parts, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
    )


class PartsResponse(Response):
    """A response whose body goes out as the parts it is made of (the JSON header, then each tensor's
    bytes), one ASGI message each, never joined: joining copied every tensor of an answer once more, about
    60 us per 256 KB in a server's request path here (see :mod:`service.http_pool`), against a few
    microseconds per extra message."""

    def __init__(self, parts: list[bytes | memoryview], *, media_type: str, headers: dict[str, str]) -> None:
        self.parts = parts
        length = sum(len(part) for part in parts)
        super().__init__(b"", media_type=media_type, headers={**headers, "content-length": str(length)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for index, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": index < last})


async def run_infer(plane: DataPlane, name: str, version: int | None, request: InferRequest) -> Response:
    result = await v2.infer(
        plane,
        name,
        version,
        input_name=request.input_name,
        values=request.values,
        datatype=request.datatype,
        outputs=[output_name for output_name, _ in request.outputs] if request.named_outputs else None,
        seed=request.seed,
    )
    binary_of = dict(request.outputs)
    default_binary = request.outputs[0][1]  # the request's binary_data_output when it named no output
    outputs = [
        _own_output(output_name, array, datatype, binary_of.get(output_name, default_binary))
        for output_name, (datatype, array) in result.outputs.items()
    ]
    parameters = {"prediction_ids": result.prediction_ids} if result.prediction_ids is not None else None
    if result.alpha is not None:
        parameters = {**(parameters or {}), "alpha": result.alpha}
    return answer(name, request.id, result.calibrator_version, outputs, parameters)


def _requested_outputs(request: dict[str, Any]) -> list[tuple[str, bool]] | None:
    """``[(name, binary)]`` of the request's ``outputs`` (None when it names none), checked."""
    parameters = _object(request.get("parameters") or {}, "parameters")
    binary_default = _flag(parameters.get("binary_data_output", False), "binary_data_output")
    requested = request.get("outputs")
    if requested is None:
        return None
    if not isinstance(requested, list) or not requested:
        raise InvalidInput("outputs must be a non-empty list of {name, parameters}")
    outputs = []
    for index, item in enumerate(requested):
        item = _object(item, f"outputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}]: name must be a string, got {name!r}")
        output_parameters = _object(item.get("parameters") or {}, f"output {name!r} parameters")
        binary = _flag(output_parameters.get("binary_data", binary_default), f"output {name!r} binary_data")
        outputs.append((name, binary))
    return outputs


async def run_upstream_infer(
    plane: DataPlane,
    upstream: tuple[ModelInfo, ActiveCalibrator],
    body: bytes,
    header_length: str | None,
    content_type: str | None,
) -> Response:
    """An upstream model's inference: inputs forwarded unchanged, logits calibrated, the upstream's other
    outputs passed through as it wrote them."""
    info, entry = upstream
    request, binary = wire.split_body(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"id must be a string, got {request_id!r}")
    wanted = _requested_outputs(request)
    if not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise InvalidInput("inputs must be a non-empty list of tensors")
    forward_headers = {"content-type": content_type or JSON}
    if header_length is not None:
        forward_headers[HEADER_LENGTH] = header_length
    result = await plane.infer_upstream(info, entry, request, binary, (body, forward_headers))
    if isinstance(result, PassedThrough):
        return Response(result.body, headers=result.headers)
    upstream_answer = result.answer
    if wanted is None:  # as the upstream did: every output, in the request's default form
        parameters = _object(request.get("parameters") or {}, "parameters")
        default = bool(parameters.get("binary_data_output", False))
        binary_of = {}
        names = None
    else:
        default = False
        binary_of = dict(wanted)
        names = [name for name, _ in wanted]
    outputs = []
    for name, own in v2.upstream_outputs(result, names):
        if own is None:
            outputs.append(upstream_answer.outputs[name])
        else:
            outputs.append(_own_output(name, own[1], own[0], binary_of.get(name, default)))
    parameters = {"upstream_model_version": upstream_answer.document.get("model_version")}
    if result.ids is not None:
        parameters["prediction_ids"] = result.ids.as_list()
    if result.alpha is not None:
        parameters["alpha"] = result.alpha
    return answer(info.name, request_id, result.calibrator_version, outputs, parameters)


async def infer(request: LeanRequest) -> Response:
    """``POST /v2/models/{name}[/versions/{version}]/infer``: decode, calibrate (or predict, or go upstream),
    encode."""
    authorize(request, "read")
    plane: DataPlane = request.scope["app"].state.dataplane
    name = validate_model_name(request.path_params["name"])
    version = parse_version(request.path_params.get("version"), field="model version")
    plane.require_ready()
    # JSON, or (binary extension) JSON followed by tensor bytes, which some clients label octet-stream
    content_type = request.header("content-type")
    body_type(content_type, (JSON, RAW))
    raw_length = request.header(HEADER_LENGTH.lower())
    header_length = raw_length.decode("latin-1") if raw_length is not None else None
    body = await request.body()
    upstream = await plane.upstream_model_async(name, version)
    if upstream is not None:
        content = content_type.decode("latin-1") if content_type is not None else None
        return await run_upstream_infer(plane, upstream, body, header_length, content)
    return await run_infer(plane, name, version, parse_infer(body, header_length))


ROUTES = [
    LeanRoute("/v2/models/{name}/infer", infer, methods=["POST"], name="oip_infer"),
    LeanRoute(
        "/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"], name="oip_infer_version"
    ),
]


# -------------------------------------------------------------------------------------- metadata, health


_ERRORS = {
    400: {"description": 'bad request or tensor: {"error": "..."}'},
    404: {"description": 'unknown model or version: {"error": "..."}'},
    503: {"description": 'not ready: {"error": "..."}'},
}


@router.get("", summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> Response:
    return json_response(v2.server_metadata())


@router.get("/health/live", summary="Server liveness (Open Inference Protocol)")
async def server_live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server readiness (Open Inference Protocol)", responses=_ERRORS)
async def server_ready(plane: Plane) -> Response:
    """Ready once loaded, and while every upstream server in use is ready (else 503 naming it)."""
    if not plane.ready:
        return json_response({"ready": False}, 503)
    reason = await v2.server_not_ready(plane)
    if reason is not None:
        return json_response({"ready": False, "error": reason}, 503)
    return json_response({"ready": True})


@router.get(
    "/models/{name}",
    summary="Model metadata (Open Inference Protocol)",
    responses=_ERRORS,
    dependencies=ReadAccess,
)
async def get_model_metadata(name: ModelName, plane: Plane) -> Response:
    return json_response(await v2.model_metadata(plane, name, None))


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata of one calibrator version (Open Inference Protocol)",
    responses=_ERRORS,
    dependencies=ReadAccess,
)
async def get_model_version_metadata(name: ModelName, version: Version, plane: Plane) -> Response:
    return json_response(await v2.model_metadata(plane, name, version))


async def _ready(plane: DataPlane, name: str, version: int | None) -> Response:
    reason = await v2.model_not_ready(plane, name, version)
    if reason is not None:
        return json_response({"name": name, "ready": False, "reason": reason}, 503)
    return json_response({"name": name, "ready": True})


@router.get(
    "/models/{name}/ready",
    summary="Model readiness (Open Inference Protocol)",
    responses=_ERRORS,
    dependencies=ReadAccess,
)
async def model_ready(name: ModelName, plane: Plane) -> Response:
    return await _ready(plane, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Readiness of one calibrator version (Open Inference Protocol)",
    responses=_ERRORS,
    dependencies=ReadAccess,
)
async def model_version_ready(name: ModelName, version: Version, plane: Plane) -> Response:
    return await _ready(plane, name, version)


# Last of this router: /v2 paths that no route answers get the protocol's own error format too.
@router.api_route("/{rest:path}", methods=fallback.METHODS, include_in_schema=False)
async def unmatched(request: Request) -> Response:
    return fallback.check_unmatched(request, b"/v2/models/")
