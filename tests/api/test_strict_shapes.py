"""Malformed shapes and element types in every wire format are a 400 in the path's format, never a 5xx.

Each request below used to answer 500 (with two tracebacks in the log and a dropped connection): a
``X-Tensor-Shape`` with a Unicode digit (``str.isdigit`` takes ``'³'``, ``int`` does not) or a dimension too
large for numpy, a ``.npy`` header with no real element type (``'<f1'``) or with such a dimension, an Open
Inference Protocol shape of 10**19; and a ``.npy`` header ``(1,,3)`` was accepted as ``(1, 3)``. One strict
parser (``service.api.tensors.check_shape`` / ``shape_from_text``) now reads every shape.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from service.api import tensors
from service.errors import InvalidInput
from tests.helpers.problems import assert_problem

HUGE = "99999999999999999999999"


def npy_with_header(text: str, data: bytes = b"") -> bytes:
    header = text.encode("latin-1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


@pytest.fixture
def three(client):
    assert client.put("/v1/models/three", json={"num_classes": 3}).status_code == 201
    return client


RAW = {"Content-Type": tensors.RAW}
NPY = {"Content-Type": tensors.NPY}


@pytest.mark.parametrize(
    ("headers", "content", "needle"),
    [
        ({**RAW, "X-Tensor-Shape": "1,³".encode("latin-1")}, b"\0" * 12, "X-Tensor-Shape"),
        ({**RAW, "X-Tensor-Shape": "1,٣".encode()}, b"\0" * 12, "X-Tensor-Shape"),
        ({**RAW, "X-Tensor-Shape": f"0,{HUGE}"}, b"", "X-Tensor-Shape"),
        ({**RAW, "X-Tensor-Shape": "0,2147483648"}, b"", "over the limit"),
        ({**RAW, "X-Tensor-Shape": "65536,65536"}, b"", "elements"),
        ({**RAW, "X-Tensor-Shape": "1,-3"}, b"", "X-Tensor-Shape"),
        ({**RAW, "X-Tensor-Shape": ",".join(["1"] * 9)}, b"\0" * 4, "dimensions"),
        (NPY, npy_with_header("{'descr': '<f1', 'fortran_order': False, 'shape': (0,), }"), "'<f1'"),
        (
            NPY,
            npy_with_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': (0, {HUGE}), }}"),
            "shape",
        ),
        (NPY, npy_with_header(f"{{'shape': (0, {HUGE}), 'descr': '<f4', 'fortran_order': False}}"), "limit"),
        (
            NPY,
            npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,,3), }", b"\0" * 12),
            "1,,3",
        ),
        (
            NPY,
            npy_with_header("{'descr': '<c8', 'fortran_order': False, 'shape': (1, 3), }", b"\0" * 24),
            "<c8",
        ),
        (NPY, npy_with_header("{'descr': '<f4', 'fortran_order': 1, 'shape': (1, 3), }", b"\0" * 12), "npy"),
        (NPY, npy_with_header("__import__('os').getpid()"), "npy"),
        (NPY, b"\x93NUMPY\x01\x00\xff\xff{", "npy"),
    ],
)
def test_malformed_tensor_headers_are_400(three, headers, content, needle):
    response = three.post("/v1/models/three/calibrate", content=content, headers=headers)
    assert_problem(response, 400, needle)
    assert three.get("/healthz").status_code == 200


def test_oip_huge_shape_is_400_in_the_protocols_format(three):
    for shape in ([0, 10**19], [0, 2**31], [2**16, 2**16], [1, -3], [1, True]):
        body = {"inputs": [{"name": "logits", "datatype": "FP32", "shape": shape, "data": []}]}
        response = three.post("/v2/models/three/infer", json=body)
        assert response.status_code == 400, (shape, response.text)
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"error"} and "shape" in response.json()["error"]
    binary = {
        "inputs": [
            {
                "name": "logits",
                "datatype": "FP32",
                "shape": [0, 10**19],
                "parameters": {"binary_data_size": 0},
            }
        ]
    }
    response = three.post("/v2/models/three/infer", json=binary)
    assert response.status_code == 400 and "error" in response.json()


def npz_of_members(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name + ".npy", data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,,3), }", b"\0" * 24, "2,,3"),
        (f"{{'descr': '<f4', 'fortran_order': False, 'shape': (0, {HUGE}), }}", b"", "shape"),
        ("{'descr': '<f1', 'fortran_order': False, 'shape': (2, 3), }", b"\0" * 6, "'<f1'"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", b"\0" * 8, "bytes"),
    ],
)
def test_npz_members_go_through_the_same_parser(three, header, data, needle):
    body = npz_of_members(logits=npy_with_header(header, data), labels=npz_member(np.array([0, 1])))
    response = three.post("/v1/metrics", content=body, headers={"Content-Type": tensors.NPZ})
    assert_problem(response, 400, needle)
    assert three.get("/healthz").status_code == 200


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_model_input_shape_header_uses_the_parser(three):
    response = three.put(
        "/v1/models/up/torchscript",
        content=b"not a model",
        headers={"Content-Type": "application/octet-stream", "X-Model-Input-Shape": "6,³".encode("latin-1")},
    )
    assert_problem(response, 400, "X-Model-Input-Shape")


def test_the_parser_accepts_what_numpy_writes():
    for array in (
        np.zeros((2, 3), np.float32),
        np.arange(5, dtype=np.int64),
        np.ones((2, 3), ">f8"),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.zeros((0, 4), np.float16),
        np.array([True, False]),
        np.float32(1.5),
    ):
        buffer = io.BytesIO()
        np.save(buffer, array)
        decoded = tensors.decode_npy(buffer.getvalue())
        np.testing.assert_array_equal(decoded, array)
        assert decoded.flags.c_contiguous and decoded.flags.writeable and decoded.dtype.isnative
    assert tensors.parse_shape(" 64 , 1000 ") == (64, 1000)
    assert tensors.shape_from_text("3,", "x", trailing_comma=True) == (3,)
    with pytest.raises(InvalidInput):
        tensors.shape_from_text("3,", "x")
    with pytest.raises(InvalidInput):
        tensors.shape_from_text("1,,3", "x", trailing_comma=True)
