"""Tensors on the wire: JSON, numpy ``.npy`` and raw little-endian bytes, chosen by Content-Type / Accept.

Media types of ``POST /v1/models/{name}/calibrate`` and ``/predict``:

``application/json`` (default)
    ``{"logits": [[..]]}`` etc.; answered as ``{"probabilities": [[..]], "predicted_class": [..], ...}``.
``application/x-npy``
    One array in numpy's ``.npy`` format (``np.save``); read with ``allow_pickle=False``, so object arrays
    are refused. Answered with the probabilities as ``.npy``.
``application/octet-stream``
    Raw little-endian numbers, row-major, with the shape in ``X-Tensor-Shape: N,K`` and the element type in
    ``X-Tensor-Dtype`` (``float32`` by default, ``float64`` or ``float16``). Answered the same way.

Headers of binary requests and answers (:data:`SHAPE_HEADER` and friends):

- ``X-Tensor-Name``: which array the body is: ``logits`` (default of /calibrate) or ``probabilities``;
  ``inputs`` for /predict. Answers name ``probabilities``.
- ``X-Tensor-Shape``, ``X-Tensor-Dtype``: shape and element type (answers carry both, ``.npy`` too).
- ``X-Calibrator-Version``: the calibrator version that answered, or ``none`` (plain softmax).
- ``X-Predicted-Class``: comma-separated argmax per row, for answers of at most
  :data:`MAX_PREDICTED_CLASS_ROWS` rows (a header must stay small; take the argmax yourself beyond).
- ``X-Prediction-Id-Prefix``: with the prediction log on, the prefix of the rows' prediction ids (row ``i``
  is ``<prefix>.<i>``), for posting their outcomes later.

Binary answers hold float32 probabilities unless the request's tensor was float64 (then float64): float32
keeps about 7 significant digits, far below any calibration error, at half the bytes. JSON answers carry
the float64 values. Without an ``Accept`` header (or with ``*/*``) the answer takes the request's type.
"""

from __future__ import annotations

import ast
import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from service.errors import InvalidInput, NotAcceptable, PayloadTooLarge, UnsupportedMediaType

JSON = "application/json"
NPY = "application/x-npy"
RAW = "application/octet-stream"
MEDIA_TYPES = (JSON, NPY, RAW)
NPZ = "application/x-npz"

NAME_HEADER = "X-Tensor-Name"
SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
VERSION_HEADER = "X-Calibrator-Version"
PREDICTED_HEADER = "X-Predicted-Class"
# With the prediction log on: the prefix of the answer's prediction ids, row i's id being "<prefix>.<i>".
PREDICTION_ID_HEADER = "X-Prediction-Id-Prefix"
# Seconds since the store was last read, on answers served from a cached view while it cannot be read (S3).
STORE_AGE_HEADER = "X-Store-View-Age"
MAX_PREDICTED_CLASS_ROWS = 1024
MAX_DIMENSIONS = 8
# Bounds of every shape a request declares (header, .npy, .npz member, OIP tensor), checked before any
# allocation: a dimension fits in an int32 (what torch and most clients index with), and so does the
# number of elements of the non-zero dimensions (2**31 float32 values are 8 GiB, far past any body limit).
MAX_DIMENSION = 2**31 - 1
MAX_ELEMENTS = 2**31 - 1
MAX_DIGITS = 10
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")

# Element types accepted in raw bodies, by their X-Tensor-Dtype name; always little-endian on the wire.
RAW_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
}
_NPY_MAGIC = b"\x93NUMPY"
# The header np.save writes for a plain C-ordered array; anything else goes through np.load.
_NPY_SIMPLE_HEADER = re.compile(
    rb"\{'descr': '(?P<descr>[<|=]?[a-z][0-9]{1,2})', 'fortran_order': False, 'shape': \((?P<shape>[0-9, ]*)\), \}"
)
# Element types of .npy bodies and .npz members: numbers and booleans (read in the machine's byte order).
_NPY_DESCR = re.compile(r"[<>=|]?(?:f[248]|[iu][1248]|b1)")
MAX_NPY_HEADER_BYTES = 10_000  # numpy's own default bound (np.lib.format's max_header_size)


def media_type(header: bytes | str | None) -> str:
    """The media type of a Content-Type header, lower-case and without parameters; JSON when absent."""
    if not header:
        return JSON
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    return header.split(";", 1)[0].strip().lower() or JSON


def request_type(header: bytes | str | None) -> str:
    """The media type of a request body: one of :data:`MEDIA_TYPES`, else 415."""
    kind = media_type(header)
    if kind in MEDIA_TYPES:
        return kind
    if kind == "application/npy":  # a spelling some clients use
        return NPY
    raise UnsupportedMediaType(
        f"Content-Type {kind!r} is not supported; send one of {', '.join(MEDIA_TYPES)}"
    )


def body_type(header: bytes | str | None, allowed: tuple[str, ...], default: str | None = None) -> str:
    """The media type of a request body, one of ``allowed``; else 415 naming them.

    Without a Content-Type the body is read as ``default`` (the route's first type unless given), as
    non-browser clients often send none; browsers send one (text/plain, a form) or, when they send none,
    an ``Origin`` that the cross-origin guard (:mod:`service.api.browsers`) refuses unless allowed.
    """
    if not header:
        return default or allowed[0]
    kind = media_type(header)
    if kind == "application/npy" and NPY in allowed:
        return NPY
    if kind in allowed:
        return kind
    raise UnsupportedMediaType(
        f"Content-Type {kind[:100]!r} is not supported here; send {' or '.join(allowed)}"
    )


def require_json_answer(accept: bytes | str | None) -> None:
    """406 unless ``Accept`` admits JSON (the answer, or its problem+json errors)."""
    if not accept:
        return
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    for _, _, kind in _accepted(accept):
        if kind in (JSON, "application/problem+json", "*/*", "application/*"):
            return
    raise NotAcceptable(f"cannot answer {accept[:100]!r}; this route answers {JSON}")


def _accepted(header: str) -> Iterable[tuple[float, int, str]]:
    for position, part in enumerate(header.split(",")):
        pieces = [piece.strip() for piece in part.split(";")]
        quality = 1.0
        for parameter in pieces[1:]:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if pieces[0] and quality > 0.0:
            yield -quality, position, pieces[0].lower()


def response_type(accept: bytes | str | None, request_kind: str) -> str:
    """The answer's media type for an ``Accept`` header (q-values honoured); 406 if none can be served.

    A missing header, ``*/*`` or ``application/*`` gives the request's own type.
    """
    if not accept:
        return request_kind
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    for _, _, kind in sorted(_accepted(accept)):
        if kind in MEDIA_TYPES:
            return kind
        if kind == "application/npy":
            return NPY
        if kind in ("*/*", "application/*"):
            return request_kind
    raise NotAcceptable(f"cannot answer {accept!r}; this route answers {', '.join(MEDIA_TYPES)}")


# ------------------------------------------------------------------------------------------------ decode


def check_shape(
    dims: Sequence[int], what: str, *, min_dims: int = 1, field: str | None = None
) -> tuple[int, ...]:
    """``dims`` if they make a shape this service reads: ``min_dims`` to :data:`MAX_DIMENSIONS` non-negative
    integers, each at most :data:`MAX_DIMENSION`, the non-zero ones multiplying to at most
    :data:`MAX_ELEMENTS`; else 400 naming ``what`` (and ``field``, ``what`` by default). Checked before
    anything is allocated for the array."""
    field = field or what
    if not min_dims <= len(dims) <= MAX_DIMENSIONS:
        raise InvalidInput(
            f"{what} must have {min_dims} to {MAX_DIMENSIONS} dimensions, got {len(dims)}", field=field
        )
    elements = 1
    for size in dims:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{what}: dimensions must be non-negative integers, got {size!r}", field=field)
        if size > MAX_DIMENSION:
            raise InvalidInput(f"{what}: dimension {size} is over the limit of {MAX_DIMENSION}", field=field)
        elements *= max(size, 1)
        if elements > MAX_ELEMENTS:
            raise InvalidInput(
                f"{what}: shape {list(dims)} holds more than {MAX_ELEMENTS} elements", field=field
            )
    return tuple(dims)


def shape_from_text(
    text: str, what: str, *, min_dims: int = 1, trailing_comma: bool = False, field: str | None = None
) -> tuple[int, ...]:
    """The one parser of shapes written as text (``"64,1000"``; ``"64, 1000,"`` in ``.npy`` headers with
    ``trailing_comma``): ASCII digits only (``str.isdigit`` also takes ``'³'``), at most
    :data:`MAX_DIGITS` of them per dimension, then :func:`check_shape`. 400 naming ``what`` otherwise."""
    field = field or what
    parts = [part.strip(" ") for part in text.split(",")]
    if trailing_comma and len(parts) > 1 and parts[-1] == "":
        parts.pop()  # "(3,)" and "(3, 4,)" as Python writes tuples; "(1,,3)" stays malformed
    if parts == [""]:
        parts = []
    if not all(_DIGITS.fullmatch(part) for part in parts):
        raise InvalidInput(
            f"{what} must be {min_dims} to {MAX_DIMENSIONS} comma-separated non-negative integers "
            f"(at most {MAX_DIGITS} digits each), got {text[:100]!r}",
            field=field,
        )
    return check_shape([int(part) for part in parts], what, min_dims=min_dims, field=field)


def parse_shape(text: bytes | str | None, *, header: str = SHAPE_HEADER) -> tuple[int, ...]:
    """``"64,1000"`` -> ``(64, 1000)``; 400 naming the header for anything else."""
    if text is None:
        raise InvalidInput(f"a raw tensor body needs its shape in the {header} header, e.g. '64,1000'")
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return shape_from_text(text, header)


def raw_dtype(text: bytes | str | None) -> np.dtype:
    """The element type named by ``X-Tensor-Dtype`` (float32 when absent)."""
    if text is None:
        return RAW_DTYPES["float32"]
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        return RAW_DTYPES[text.strip().lower()]
    except KeyError:
        raise InvalidInput(
            f"{DTYPE_HEADER} {text!r} is not supported; use one of {', '.join(RAW_DTYPES)}"
        ) from None


def decode_raw(
    body: bytes | memoryview,
    shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    fortran_order: bool = False,
    what: str = "body",
) -> np.ndarray:
    """``body`` as a ``shape`` array of ``dtype`` (a writable copy); 400 on a size mismatch."""
    check_shape(shape, what, min_dims=0)
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise InvalidInput(
            f"the {'body' if what == 'body' else what} has {len(body)} bytes; shape "
            f"{','.join(map(str, shape))} of {dtype.name} needs {expected}",
            field=what,
        )
    # a copy: a view of the immutable body would be read-only, which torch.from_numpy warns about
    array = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    return array.astype(dtype.newbyteorder("="), order="C", copy=True)


def npy_dtype(descr: object, what: str) -> np.dtype:
    """The element type of a ``.npy`` ``descr``: numbers and booleans only (``'<f1'`` is no type at all)."""
    if not isinstance(descr, str) or not _NPY_DESCR.fullmatch(descr):
        raise InvalidInput(
            f"{what}: a .npy array must hold numbers (float16/32/64, signed or unsigned integers, "
            f"booleans), got elements of type {str(descr)[:40]!r}",
            field=what,
        )
    return np.dtype(descr)


def read_npy_header(header: bytes, what: str) -> tuple[np.dtype, bool, tuple[int, ...]]:
    """``(dtype, fortran_order, shape)`` of a ``.npy`` header dictionary, parsed strictly.

    The header np.save writes is matched directly; any other spelling is read with ``ast.literal_eval``
    (a literal, never code) after a bound on its length. Either way the element type must be one of
    :func:`npy_dtype`'s and the shape passes :func:`check_shape` before anything is allocated.
    """
    match = _NPY_SIMPLE_HEADER.match(header)
    if match is not None:
        dtype = npy_dtype(match["descr"].decode("ascii"), what)
        shape = shape_from_text(
            match["shape"].decode("ascii"),
            f"{what}: the .npy shape",
            min_dims=0,
            trailing_comma=True,
            field=what,
        )
        return dtype, False, shape
    if len(header) > MAX_NPY_HEADER_BYTES:
        raise InvalidInput(f"{what}: the .npy header is over {MAX_NPY_HEADER_BYTES} bytes", field=what)
    try:
        fields = ast.literal_eval(header.decode("latin-1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        fields = None
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise InvalidInput(
            f"{what}: the .npy header is not a dictionary of descr, fortran_order and shape", field=what
        )
    shape, fortran_order = fields["shape"], fields["fortran_order"]
    if not isinstance(fortran_order, bool) or not isinstance(shape, tuple):
        raise InvalidInput(f"{what}: the .npy header's fortran_order or shape is malformed", field=what)
    shape = check_shape(shape, f"{what}: the .npy shape", min_dims=0, field=what)
    return npy_dtype(fields["descr"], what), fortran_order, shape


def _npy_parts(body: bytes | memoryview, what: str) -> tuple[np.dtype, bool, tuple[int, ...], int]:
    """``(dtype, fortran_order, shape, offset of the data)`` of a ``.npy`` file's bytes."""
    if bytes(body[:6]) != _NPY_MAGIC or len(body) < 10:
        raise InvalidInput(f"{what} is not a .npy file (it lacks the \\x93NUMPY magic)", field=what)
    major = body[6]
    if major == 1:
        header_length = int.from_bytes(body[8:10], "little")
        start = 10
    elif major in (2, 3):
        header_length = int.from_bytes(body[8:12], "little")
        start = 12
    else:
        raise InvalidInput(f"{what}: unsupported .npy format version {major}", field=what)
    if start + header_length > len(body):
        raise InvalidInput(f"{what}: the .npy header runs past the end of the data", field=what)
    dtype, fortran_order, shape = read_npy_header(bytes(body[start : start + header_length]), what)
    return dtype, fortran_order, shape, start + header_length


def decode_npy(body: bytes) -> np.ndarray:
    """The array in a ``.npy`` body; never unpickles. 400 for anything that is not one numeric array."""
    dtype, fortran_order, shape, offset = _npy_parts(body, "body")
    return decode_raw(memoryview(body)[offset:], shape, dtype, fortran_order=fortran_order)


def decode_npz(body: bytes, *, max_bytes: int) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` body (``np.savez`` or ``np.savez_compressed``); never unpickles.

    Every member must be one ``.npy`` array of numbers or booleans. Their uncompressed sizes together may not
    pass ``max_bytes`` (the body limit: a compressed archive carries no more than a plain body could), and
    each member's header must describe exactly the bytes it holds; both are checked before anything is
    allocated, so a small archive cannot claim gigabytes.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        raise InvalidInput(
            "the body is not an .npz archive (a zip of .npy arrays, as np.savez writes)", field="body"
        ) from None
    total = sum(member.file_size for member in members)
    if total > max_bytes:
        raise PayloadTooLarge(
            f"the .npz archive holds {total} bytes uncompressed, over the limit of {max_bytes} bytes "
            "(CALIBSERVE_MAX_BODY_BYTES)"
        )
    arrays: dict[str, np.ndarray] = {}
    for member in members:
        name = member.filename
        key = name[:-4] if name.endswith(".npy") else name
        if not name.endswith(".npy") or not key:
            raise InvalidInput(f"the .npz member {name[:80]!r} is not a .npy array", field="body")
        if key in arrays:
            raise InvalidInput(f"the .npz archive holds {key!r} twice", field=key)
        try:
            if member.compress_type == zipfile.ZIP_STORED and not member.flag_bits & _ZIP_ENCRYPTED:
                stream = _StoredMember(_stored_member_data(body, member, key))
                arrays[key] = _read_npz_member(stream, key, member.file_size)
                continue
            with archive.open(member) as stream:
                arrays[key] = _read_npz_member(stream, key, member.file_size)
        except InvalidInput:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise InvalidInput(
                f"the .npz member {key!r} is not a readable .npy array: {exc}", field=key
            ) from None
    return arrays


_ZIP_ENCRYPTED = 0x1
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader: 30 bytes, then name and extra
_LOCAL_MAGIC = b"PK\x03\x04"


def _stored_member_data(body: bytes, member: zipfile.ZipInfo, key: str) -> memoryview:
    """The bytes of an uncompressed (``np.savez``) member where they lie in the body, CRC-checked as
    ``zipfile`` checks them. ``zipfile``'s reader copies them through its buffers twice, which cost 70 ms
    of a 1M x 10 float32 fit body against ~20 ms for the CRC and the one copy into the array."""
    start = member.header_offset
    header = body[start : start + _LOCAL_HEADER.size]
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
        raise InvalidInput(
            f"the .npz member {key!r} is not a readable .npy array: bad local header", field=key
        )
    fields = _LOCAL_HEADER.unpack(header)
    data_start = start + _LOCAL_HEADER.size + fields[10] + fields[11]  # name and extra field lengths
    data = memoryview(body)[data_start : data_start + member.file_size]
    if len(data) != member.file_size or zlib.crc32(data) != member.CRC:
        raise InvalidInput(f"the .npz member {key!r} is not a readable .npy array: bad CRC", field=key)
    return data


class _StoredMember:
    """``read(n)`` over a member's bytes, as :func:`_read_npz_member` reads a zip stream: small reads
    (the header) as bytes, the data as a view of the body."""

    def __init__(self, data: memoryview) -> None:
        self._data, self._position = data, 0

    def read(self, n: int) -> bytes | memoryview:
        chunk = self._data[self._position : self._position + n]
        self._position += len(chunk)
        return bytes(chunk) if n <= MAX_NPY_HEADER_BYTES + 12 else chunk


def _read_npz_member(stream, key: str, size: int) -> np.ndarray:
    # Read the magic and header length, then the header itself, and check the shape against the member's
    # size before reading its data: the member's size is bounded (by the archive's total) and so is the read.
    prefix = stream.read(12)
    major = prefix[6] if len(prefix) > 6 else 0
    header_length = int.from_bytes(prefix[8:10] if major == 1 else prefix[8:12], "little")
    start = 10 if major == 1 else 12
    if header_length > MAX_NPY_HEADER_BYTES or start + header_length > size:
        raise InvalidInput(f"the .npz member {key!r} is not a readable .npy array", field=key)
    head = prefix + stream.read(start + header_length - len(prefix))
    dtype, fortran_order, shape, offset = _npy_parts(head, key)
    expected = math.prod(shape) * dtype.itemsize
    if offset + expected != size:
        raise InvalidInput(
            f"{key}: its header says shape {list(shape)} of {dtype.name} ({expected} bytes) but it holds "
            f"{size - offset}",
            field=key,
        )
    return decode_raw(stream.read(expected), shape, dtype, fortran_order=fortran_order, what=key)


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ encode


def wire_dtype(source: np.dtype | None) -> np.dtype:
    """Element type of binary answers: float64 when the request sent float64, else float32."""
    return RAW_DTYPES["float64"] if source is not None and source == np.float64 else RAW_DTYPES["float32"]


def encode_raw(array: np.ndarray, dtype: np.dtype) -> bytes:
    return np.asarray(array, dtype=dtype, order="C").tobytes()


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The version 1.0 ``.npy`` header of a C-ordered array (what ``np.save`` writes)."""
    shape_text = "(" + "".join(f"{size}, " for size in shape).rstrip(" ")
    if len(shape) != 1:
        shape_text = shape_text.rstrip(",")
    header = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape_text}), }}"
    # magic (6) + version (2) + length (2) + header + padding + newline is a multiple of 64
    padding = 63 - (10 + len(header)) % 64
    text = (header + " " * padding + "\n").encode("latin-1")
    return _NPY_MAGIC + b"\x01\x00" + len(text).to_bytes(2, "little") + text


def encode_npy(array: np.ndarray, dtype: np.dtype) -> bytes:
    data = np.asarray(array, dtype=dtype, order="C")
    return npy_header(data.dtype, data.shape) + data.tobytes()


def shape_text(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


__all__ = [
    "DTYPE_HEADER",
    "JSON",
    "MEDIA_TYPES",
    "NAME_HEADER",
    "NPY",
    "NPZ",
    "PREDICTED_HEADER",
    "RAW",
    "SHAPE_HEADER",
    "VERSION_HEADER",
    "decode_npy",
    "decode_npz",
    "decode_raw",
    "encode_npy",
    "encode_raw",
    "media_type",
    "parse_shape",
    "raw_dtype",
    "request_type",
    "response_type",
]
