"""The Open Inference Protocol over gRPC (KServe V2 / Triton ``inference.GRPCInferenceService``), for both
of its sides: calibserve's gRPC server (:mod:`service.api.grpc`) and its gRPC upstream client
(:mod:`service.upstream_grpc`).

The messages are Triton's, generated from ``grpc_service.proto`` and ``model_config.proto`` of
https://github.com/triton-inference-server/common (``protobuf/``, BSD-3-Clause, NVIDIA) and shipped with
``tritonclient[grpc]`` as ``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc`` (Triton's documentation
uses them so for raw gRPC clients). They are not generated again here on purpose: protobuf keeps one
descriptor pool per process, and a second ``grpc_service.proto`` that differs by a field from the one
tritonclient registered fails to load ("duplicate file name grpc_service.proto") in any process that holds
both (a test, a bench, a user's client embedding calibserve). The ``grpc`` extra declares the dependency;
the stubs are imported on first use, only where a gRPC port or a ``grpc://`` upstream is configured.

A tensor's numbers travel either as typed ``contents`` (``fp32_contents``...; FP16 has none) or as bytes
in ``raw_input_contents`` / ``raw_output_contents`` (one entry per tensor, little-endian, row-major); both
are read and written here, with the shape and byte-count checks every reader needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

from service.errors import InvalidInput, MissingDependency
from service.inference_protocol import NUMPY_TYPES
from service.lazy import require_module

SERVICE = "inference.GRPCInferenceService"
NEEDED_FOR = "the Open Inference Protocol over gRPC (CALIBSERVE_GRPC_PORT, grpc:// upstreams)"
# The typed field of InferTensorContents that holds each datatype; FP16 has none (raw bytes only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_CONTENTS = (*sorted(set(CONTENTS_FIELD.values())), "bytes_contents")


def require(name: str) -> ModuleType:
    """Module ``name`` of the grpc extra; MissingDependency naming the extra where it is not installed."""
    try:
        return require_module(name, needed_for=NEEDED_FOR)
    except (MissingDependency, ModuleNotFoundError):  # name the extra to install, not the module
        raise MissingDependency(
            f"{NEEDED_FOR} needs grpcio and tritonclient[grpc], which this installation lacks: "
            "install calibserve[grpc]"
        ) from None


@cache
def messages() -> ModuleType:
    """``service_pb2``: the protocol's request and response messages."""
    require("grpc")
    return require("tritonclient.grpc.service_pb2")


@cache
def services() -> ModuleType:
    """``service_pb2_grpc``: the service's servicer base class and client stub."""
    messages()
    return require("tritonclient.grpc.service_pb2_grpc")


def tensor_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    """``shape`` as a tuple; InvalidInput for an empty shape or a negative size."""
    dims = tuple(int(size) for size in shape)
    if not dims or any(size < 0 for size in dims):
        raise InvalidInput(f"{what}: shape must be a list of non-negative integers, got {list(dims)}")
    return dims


def has_contents(tensor: Any) -> bool:
    """Whether a tensor message carries typed ``contents``."""
    contents = tensor.contents
    return any(len(getattr(contents, name)) for name in _ALL_CONTENTS)


def tensor_array(tensor: Any, raw: bytes | None, what: str) -> np.ndarray:
    """The numbers of an input or output tensor message: from ``raw`` (its entry of the raw contents) when
    given, else from its typed ``contents``. InvalidInput when the bytes or the count of numbers do not
    match the shape and datatype, or when a tensor gives both."""
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"{what}: datatype must be one of {', '.join(NUMPY_TYPES)}, got {tensor.datatype!r}"
        )
    shape = tensor_shape(tensor.shape, what)
    count = math.prod(shape)
    if raw is not None:
        if has_contents(tensor):
            raise InvalidInput(f"{what}: give typed contents or raw contents, not both")
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"{what}: {len(raw)} bytes of raw contents; shape {list(shape)} of {tensor.datatype} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"{what}: {tensor.datatype} has no typed contents; send it as raw contents")
    values = getattr(tensor.contents, field)
    others = [name for name in _ALL_CONTENTS if name != field and len(getattr(tensor.contents, name))]
    if others:
        raise InvalidInput(
            f"{what}: a {tensor.datatype} tensor holds its numbers in {field}, not {others[0]}"
        )
    if len(values) != count:
        raise InvalidInput(f"{what}: contents hold {len(values)} numbers; shape {list(shape)} needs {count}")
    with np.errstate(over="ignore", invalid="ignore"):  # INT8 in int_contents: values wider than the type
        return np.asarray(values, dtype=dtype).reshape(shape)


def raw_contents(tensors: Sequence[Any], raw: Sequence[bytes], what: str) -> list[bytes | None]:
    """Each tensor's entry of the raw contents (None for all when there are none); InvalidInput when the
    message holds raw contents but not one entry per tensor."""
    if not raw:
        return [None] * len(tensors)
    if len(raw) != len(tensors):
        raise InvalidInput(f"{len(raw)} raw contents for {len(tensors)} {what}: give one per tensor")
    return list(raw)


def set_tensor(tensor: Any, name: str, datatype: str, array: np.ndarray, *, raw: bool) -> bytes | None:
    """Fill a tensor message (name, datatype, shape) with ``array`` as ``datatype``: its bytes are returned
    for the raw contents when ``raw``, else written to its typed contents."""
    array = np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype])
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    if raw:
        return array.tobytes()
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return None


def parameter_value(parameter: Any) -> Any:
    """The value of an ``InferParameter`` (bool, int, str or float), None when unset."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind is not None else None


def set_parameter(parameters: Any, key: str, value: Any) -> None:
    """``parameters[key] = value`` in a map of ``InferParameter``; lists become comma-separated strings (the
    protocol's parameters are scalars)."""
    parameter = parameters[key]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, list | tuple):
        parameter.string_param = ",".join(str(item) for item in value)
    else:
        parameter.string_param = str(value)
