"""The Open Inference Protocol's (KServe V2, Triton HTTP) wire format, for both of its sides.

calibserve answers the protocol (:mod:`service.api.routers.oip`) and speaks it to an upstream inference
server (:mod:`service.upstream`); both read and write the same bodies: a JSON document, optionally followed
by the bytes of binary tensors (Triton's binary tensor data extension: the JSON header's length in
``Inference-Header-Content-Length``, each binary tensor's byte count in its ``parameters.binary_data_size``,
the tensors' bytes in the order of their entries, little-endian, row-major).

Numbers only: ``BYTES`` tensors are passed through untouched by the proxy but never decoded here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
FLOAT_TYPES = ("FP32", "FP64", "FP16")
_DATATYPE_OF = {dtype.str.lstrip("<|="): name for name, dtype in NUMPY_TYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    """The protocol's name of ``array``'s element type (InvalidInput for one it has not)."""
    name = _DATATYPE_OF.get(array.dtype.str.lstrip("<>|="))
    if name is None:
        raise InvalidInput(f"element type {array.dtype} has no Open Inference Protocol datatype")
    return name


def split_body(
    body: bytes, header_length: str | None, what: str = "the inference request"
) -> tuple[dict, bytes | memoryview]:
    """``(the JSON document, the binary bytes after it)`` of a body; InvalidInput naming what is wrong."""
    binary: bytes | memoryview = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} {header_length!r} must be a byte count within the body ({len(body)})"
            )
        view = memoryview(body)  # the tensors' bytes are read in place, never copied out of the body
        body, binary = view[:length], view[length:]
    if not body:
        raise InvalidInput(f"{what} is empty; it must be a JSON object")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return document, binary


def binary_size(entry: Mapping[str, Any], what: str) -> int | None:
    """The ``parameters.binary_data_size`` of a tensor entry, or None when its data are JSON."""
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise InvalidInput(f"{what}: parameters must be a JSON object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{what}: binary_data_size must be a byte count, got {size!r}")
    return size


def tensor_chunks(entries: Sequence[Any], binary: bytes, what: str) -> list[bytes | None]:
    """The binary bytes of each tensor entry, in order (None for one with JSON data); InvalidInput when the
    sizes do not add up to the bytes after the header."""
    chunks: list[bytes | None] = []
    offset = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise InvalidInput(f"{what}[{index}] must be a JSON object")
        size = binary_size(entry, f"{what}[{index}]")
        if size is None:
            chunks.append(None)
            continue
        if offset + size > len(binary):
            raise InvalidInput(
                f"{what}[{index}]: binary_data_size {size} runs past the {len(binary)} bytes after the header"
            )
        chunks.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes follow the JSON header that no tensor's binary_data_size claims"
        )
    return chunks


def tensor_array(entry: Mapping[str, Any], chunk: bytes | None, what: str) -> np.ndarray:
    """The numbers of one tensor entry (``name``, ``datatype``, ``shape``, ``data`` or binary bytes)."""
    datatype = entry.get("datatype")
    dtype = NUMPY_TYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"{what}: datatype must be one of {', '.join(NUMPY_TYPES)}, got {datatype!r}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or any(isinstance(size, bool) or not isinstance(size, int) or size < 0 for size in shape)
    ):
        raise InvalidInput(f"{what}: shape must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    if chunk is not None:
        if len(chunk) != count * dtype.itemsize:
            raise InvalidInput(
                f"{what}: {len(chunk)} bytes of binary data; shape {shape} of {datatype} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(chunk, dtype=dtype).reshape(shape)
    data = entry.get("data")
    if not isinstance(data, list | np.ndarray):  # an array: an entry calibserve wrote (tensor_entry)
        raise InvalidInput(f"{what}: data must be a list of numbers (flat or nested)")
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"{what}: nested data must be rectangular") from None
    if array.size != count:
        raise InvalidInput(f"{what}: data has {array.size} elements; shape {shape} needs {count}")
    if array.size and array.dtype.kind not in "biuf":
        raise InvalidInput(f"{what}: data must hold numbers only")
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(dtype).reshape(shape)


def binary_entry(name: str, array: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    """A tensor entry with binary data, and its bytes: a view of the array's own memory where it is
    row-major and little-endian (the protocol's layout), not a copy (``tobytes`` would cost one more pass
    over every tensor of every answer)."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    data = array.reshape(-1).view(np.uint8).data
    entry = {
        "name": name,
        "datatype": datatype_of(array),
        "shape": list(array.shape),
        "parameters": {"binary_data_size": len(data)},
    }
    return entry, data


def tensor_entry(name: str, array: np.ndarray, *, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """A tensor entry of ``array`` (its datatype kept), with binary data and its bytes, or with JSON data
    (``data``, flat, row-major) and None."""
    if binary:
        return binary_entry(name, array)
    entry = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
    entry["data"] = np.ascontiguousarray(array).reshape(-1)
    return entry, None


def encode_parts(
    document: Mapping[str, Any], chunks: Sequence[bytes | memoryview]
) -> tuple[list[bytes | memoryview], int | None]:
    """A body as the parts it is made of, to be written one after the other: ``([JSON header, *chunks],
    header length)``; the length is None for a JSON-only body (no chunks)."""
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return [header, *chunks], (len(header) if chunks else None)


def encode(document: Mapping[str, Any], chunks: Sequence[bytes | memoryview]) -> tuple[bytes, int | None]:
    """A body in one piece: ``(bytes, header length)`` (see :func:`encode_parts`)."""
    parts, header_length = encode_parts(document, chunks)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), header_length
