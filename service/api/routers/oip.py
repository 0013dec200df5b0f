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
from importlib import metadata
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import inference_protocol as wire
from service import workflows
from service.api.auth import ReadAccess
from service.api.bodies import LeanRequest, LeanRoute, authorize
from service.api.deps import ModelName, Plane, Version
from service.api.routers import fallback
from service.api.tensors import JSON, RAW, body_type, check_shape
from service.errors import InvalidInput, NotReady, UpstreamFailed
from service.names import parse_version, validate_model_name
from service.serving.concurrency import in_thread
from service.serving.dataplane import DataPlane
from service.serving.proxy import PassedThrough, logits_output
from service.serving.state import ActiveCalibrator, ModelInfo

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

HEADER_LENGTH = wire.HEADER_LENGTH
DATATYPES: dict[str, np.dtype] = {name: wire.NUMPY_TYPES[name] for name in wire.FLOAT_TYPES}
INPUT_NAMES = ("logits", "probabilities", "inputs")
OUTPUT_NAMES = ("probabilities", "logits", "predicted_class")
EXTENSIONS = ["binary_tensor_data"]
MAX_VERSIONS_LISTED = 100


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
    name = tensor.get("name")
    if name not in INPUT_NAMES:
        raise InvalidInput(f"input name must be one of {', '.join(INPUT_NAMES)}, got {name!r}")
    shape = _shape(tensor.get("shape"), name)
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}"
        )
    dtype = DATATYPES[datatype]
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
    if name != "inputs" and values.ndim != 2:
        raise InvalidInput(f"input {name!r}: shape must be [N, K], got {list(shape)}")
    if name == "inputs" and values.ndim < 2:
        raise InvalidInput(f"input 'inputs': shape must be [N, ...] (a batch), got {list(shape)}")

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
            output_name = item.get("name")
            if output_name not in OUTPUT_NAMES:
                raise InvalidInput(
                    f"output name must be one of {', '.join(OUTPUT_NAMES)}, got {output_name!r}"
                )
            output_parameters = _object(item.get("parameters") or {}, f"output {output_name!r} parameters")
            if output_parameters.get("classification"):
                raise InvalidInput("the classification extension is not supported; ask for predicted_class")
            wanted_binary = output_parameters.get("binary_data", binary_default)
            outputs.append((output_name, _flag(wanted_binary, f"output {output_name!r} binary_data")))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"id must be a string, got {request_id!r}")
    return InferRequest(request_id, name, values, datatype, outputs)


# ------------------------------------------------------------------------------------------------ infer


def _own_output(
    name: str, array: np.ndarray, datatype: str, binary: bool
) -> tuple[dict[str, Any], bytes | None]:
    array = np.ascontiguousarray(array, dtype=wire.NUMPY_TYPES[datatype])
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        data = array.tobytes()
        entry["parameters"] = {"binary_data_size": len(data)}
        return entry, data
    entry["data"] = array.reshape(-1)
    return entry, None


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
    body, header_length = wire.encode(document, [chunk for _, chunk in outputs if chunk is not None])
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


def infer_response(
    name: str,
    request: InferRequest,
    tensors: dict[str, np.ndarray],
    version: int | None,
    parameters: dict[str, Any] | None = None,
) -> Response:
    float_type = "FP64" if request.datatype == "FP64" else "FP32"
    outputs = [
        _own_output(
            output_name,
            tensors[output_name],
            "INT64" if output_name == "predicted_class" else float_type,
            binary,
        )
        for output_name, binary in request.outputs
    ]
    return answer(name, request.id, version, outputs, parameters)


async def run_infer(plane: DataPlane, name: str, version: int | None, request: InferRequest) -> Response:
    if request.input_name == "inputs":
        prediction = await plane.predict(name, version, request.values)
        logits = prediction.logits
    else:
        prediction = await plane.calibrate(name, version, request.input_name, request.values)
        logits = request.values
    tensors: dict[str, np.ndarray] = {"probabilities": prediction.probabilities}
    parameters = {"prediction_ids": prediction.ids.as_list()} if prediction.ids is not None else None
    wanted = {output_name for output_name, _ in request.outputs}
    if "logits" in wanted:
        from_logits = request.input_name != "probabilities"
        tensors["logits"] = logits if from_logits else workflows.scores_to_logits(logits, from_logits=False)
    if "predicted_class" in wanted:
        tensors["predicted_class"] = prediction.predicted_class
    return infer_response(name, request, tensors, prediction.calibrator_version, parameters)


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
        others = [name for name in upstream_answer.outputs if name != upstream_answer.logits_output]
        wanted = [("probabilities", default), *((name, default) for name in others)]
    float_type = "FP64" if upstream_answer.datatype == "FP64" else "FP32"
    outputs = []
    for name, as_binary in wanted:
        if name == "probabilities":
            outputs.append(_own_output(name, result.probabilities, float_type, as_binary))
        elif name == "predicted_class":
            outputs.append(_own_output(name, result.predicted_class, "INT64", as_binary))
        elif name in upstream_answer.outputs:
            outputs.append(upstream_answer.outputs[name])
        else:
            raise UpstreamFailed(f"upstream model {info.upstream.model!r} answered no output {name!r}")
    parameters = {"upstream_model_version": upstream_answer.document.get("model_version")}
    if result.ids is not None:
        parameters["prediction_ids"] = result.ids.as_list()
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


def _server_version() -> str:
    try:
        return metadata.version("calibserve")
    except metadata.PackageNotFoundError:
        return "0"


def model_metadata(info: ModelInfo, versions: list[str]) -> dict[str, Any]:
    columns = info.num_classes if info.num_classes is not None else -1
    classes = 2 if columns == 1 else columns
    inputs = [
        {"name": "logits", "datatype": "FP32", "shape": [-1, columns]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, columns]},
    ]
    if info.kind == "torchscript":
        sample = list(info.input_shape) if info.input_shape else [-1]
        datatype = {"float32": "FP32", "float64": "FP64", "float16": "FP16"}.get(
            info.input_dtype or "", "FP32"
        )
        inputs.insert(0, {"name": "inputs", "datatype": datatype, "shape": [-1, *sample]})
    return {
        "name": info.name,
        "versions": versions,
        "platform": f"calibserve_{info.kind}",
        "inputs": inputs,
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, columns]},
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
        ],
    }


_ERRORS = {
    400: {"description": 'bad request or tensor: {"error": "..."}'},
    404: {"description": 'unknown model or version: {"error": "..."}'},
    503: {"description": 'not ready: {"error": "..."}'},
}


@router.get("", summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> Response:
    return json_response({"name": "calibserve", "version": _server_version(), "extensions": EXTENSIONS})


@router.get("/health/live", summary="Server liveness (Open Inference Protocol)")
async def server_live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server readiness (Open Inference Protocol)", responses=_ERRORS)
async def server_ready(plane: Plane) -> Response:
    """Ready once loaded, and while every upstream server in use is ready (else 503 naming it)."""
    if not plane.ready:
        return json_response({"ready": False}, 503)
    try:
        await plane.require_upstreams_ready()
    except NotReady as exc:
        return json_response({"ready": False, "error": str(exc)}, 503)
    return json_response({"ready": True})


def upstream_model_metadata(info: ModelInfo, versions: list[str], upstream: dict[str, Any]) -> dict[str, Any]:
    """The upstream's metadata with calibserve's outputs first and where it comes from under ``parameters``."""
    outputs = [item for item in upstream.get("outputs", []) if isinstance(item, dict)]
    spec = info.upstream
    classes = info.num_classes
    if classes is None:
        try:
            name = logits_output(spec, [str(item.get("name")) for item in outputs]) if spec else None
        except UpstreamFailed:
            name = None
        shapes = [item.get("shape") for item in outputs if item.get("name") == name]
        shape = shapes[0] if shapes else None
        classes = shape[-1] if isinstance(shape, list) and shape and isinstance(shape[-1], int) else -1
    classes = 2 if classes == 1 else classes
    return {
        "name": info.name,
        "versions": versions,
        "platform": "calibserve_upstream",
        "inputs": upstream.get("inputs", []),
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
            *outputs,
        ],
        "parameters": {
            "upstream": {
                **(spec.to_record() if spec is not None else {}),
                "platform": upstream.get("platform"),
                "versions": upstream.get("versions"),
            }
        },
    }


@router.get(
    "/models/{name}",
    summary="Model metadata (Open Inference Protocol)",
    responses=_ERRORS,
    dependencies=ReadAccess,
)
async def get_model_metadata(name: ModelName, plane: Plane) -> Response:
    info = await in_thread(plane.model, name)  # threads: with the S3 store these may ask the bucket
    listed = await in_thread(plane.calibrator_versions, name, limit=MAX_VERSIONS_LISTED)
    versions = [str(version) for version in listed]
    if info.kind == "upstream":
        return json_response(upstream_model_metadata(info, versions, await plane.upstream_metadata(info)))
    return json_response(model_metadata(info, versions))


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata of one calibrator version (Open Inference Protocol)",
    responses=_ERRORS,
    dependencies=ReadAccess,
)
async def get_model_version_metadata(name: ModelName, version: Version, plane: Plane) -> Response:
    info, _ = await plane.lookup_async(name, version)  # NotFound for a version that does not exist
    if info.kind == "upstream":
        return json_response(
            upstream_model_metadata(info, [str(version)], await plane.upstream_metadata(info))
        )
    return json_response(model_metadata(info, [str(version)]))


async def _ready(plane: DataPlane, name: str, version: int | None) -> Response:
    info, _ = await plane.lookup_async(name, version)
    reason = info.failing
    if reason is None and info.kind == "upstream":
        reason = await plane.upstream_not_ready(info)
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
