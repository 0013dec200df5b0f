"""Labelled sets as ``.npz`` bodies (fit, evaluate, /v1/metrics): the same answers and the same validation
as JSON, and hostile archives refused before anything is allocated."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from service.api import tensors
from service.errors import InvalidInput
from tests.helpers.arrays import npz

NPZ = {"content-type": "application/x-npz"}


@pytest.fixture
def wrn(client, cifar10):
    assert client.put("/v1/models/wrn", json={"num_classes": 10}).status_code == 201
    return client


def test_fit_evaluate_and_metrics_answer_the_same_from_npz_and_json(wrn, cifar10):
    val, test = (
        (cifar10["logits_val"], cifar10["labels_val"]),
        (cifar10["logits_test"], cifar10["labels_test"]),
    )
    as_json = wrn.post(
        "/v1/models/wrn/fit", json={"logits": val[0].tolist(), "labels": val[1].tolist(), "activate": False}
    ).json()
    as_npz = wrn.post(
        "/v1/models/wrn/fit?activate=false", content=npz(logits=val[0], labels=val[1]), headers=NPZ
    ).json()
    assert as_npz["temperature"] == as_json["temperature"]
    assert as_npz["fit"]["after"] == as_json["fit"]["after"]
    assert wrn.get("/v1/models/wrn").json()["active_calibrator"] is None  # activate=false held
    wrn.post(f"/v1/models/wrn/calibrators/{as_npz['version']}/activate")

    report_json = wrn.post(
        "/v1/models/wrn/evaluate", json={"logits": test[0].tolist(), "labels": test[1].tolist(), "n_bins": 10}
    ).json()
    report_npz = wrn.post(
        f"/v1/models/wrn/evaluate?n_bins=10&version={as_npz['version']}",
        content=npz(logits=test[0], labels=test[1]),
        headers=NPZ,
    ).json()
    assert report_npz["calibrated"] == report_json["calibrated"]
    assert report_npz["conventions"]["n_bins"] == 10

    figures_json = wrn.post(
        "/v1/metrics", json={"logits": test[0].tolist(), "labels": test[1].tolist()}
    ).json()
    figures_npz = wrn.post(
        "/v1/metrics?losses=false", content=npz(logits=test[0], labels=test[1]), headers=NPZ
    )
    assert figures_npz.status_code == 200
    assert figures_npz.json()["ece"] == figures_json["ece"]
    assert "losses" not in figures_npz.json() and "losses" in figures_json


def test_npz_weights_and_options_reach_the_fit(wrn, cifar10):
    logits, labels = cifar10["logits_val"][:500], cifar10["labels_val"][:500]
    weights = np.linspace(0.5, 1.5, 500)
    body = npz(logits=logits, labels=labels, sample_weight=weights)
    weighted = wrn.post('/v1/models/wrn/fit?options={"max_iter":100}', content=body, headers=NPZ).json()
    as_json = wrn.post(
        "/v1/models/wrn/fit",
        json={
            "logits": logits.tolist(),
            "labels": labels.tolist(),
            "sample_weight": weights.tolist(),
            "options": {"max_iter": 100},
        },
    ).json()
    assert weighted["temperature"] == as_json["temperature"]
    assert weighted["params"]["max_iter"] == 100


def _problem(response, status, *words):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail
    return response.json()


def test_the_same_validation_and_messages_as_json(wrn, cifar10):
    logits = cifar10["logits_val"][:20]
    from_npz = _problem(
        wrn.post("/v1/models/wrn/fit", content=npz(logits=logits), headers=NPZ), 422, "labels"
    )
    from_json = _problem(wrn.post("/v1/models/wrn/fit", json={"logits": logits.tolist()}), 422, "labels")
    assert from_npz["detail"] == from_json["detail"]
    unknown = wrn.post(
        "/v1/models/wrn/fit", content=npz(logits=logits, labels=np.zeros(20), extra=np.ones(2)), headers=NPZ
    )
    _problem(unknown, 422, "extra")
    bad_method = wrn.post(
        "/v1/models/wrn/fit?method=nope", content=npz(logits=logits, labels=np.zeros(20, int)), headers=NPZ
    )
    _problem(bad_method, 422, "method")
    bad_options = wrn.post(
        "/v1/models/wrn/fit?options={", content=npz(logits=logits, labels=np.zeros(20, int)), headers=NPZ
    )
    _problem(bad_options, 422, "options", "JSON")
    nan = logits.copy()
    nan[3, 2] = np.nan
    from_npz = _problem(
        wrn.post("/v1/metrics", content=npz(logits=nan, labels=np.zeros(20, int)), headers=NPZ), 400
    )
    assert "row 3" in from_npz["detail"]
    wrong = wrn.post(
        "/v1/models/wrn/fit", content=npz(logits=logits[:, :3], labels=np.zeros(20, int)), headers=NPZ
    )
    _problem(wrong, 400, "10 classes")


def test_hostile_archives_are_refused_before_allocation(wrn):
    _problem(wrn.post("/v1/metrics", content=b"not a zip", headers=NPZ), 400, ".npz")
    objects = io.BytesIO()
    np.savez(objects, logits=np.array([[1, "a"]], dtype=object), labels=np.zeros(1, int))
    _problem(wrn.post("/v1/metrics", content=objects.getvalue(), headers=NPZ), 400, "numbers")
    # a member whose header claims 10^12 rows of float64 but holds 16 bytes
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 2), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(16)
    liar = io.BytesIO()
    with zipfile.ZipFile(liar, "w") as archive:
        archive.writestr("logits.npy", member)
        archive.writestr("labels.npy", member)
    _problem(wrn.post("/v1/metrics", content=liar.getvalue(), headers=NPZ), 400, "1000000000000")
    # a small compressed archive that expands past the body limit (64 MiB here)
    bomb = io.BytesIO()
    np.savez_compressed(bomb, logits=np.zeros((9_000_000, 1)), labels=np.zeros(1, int))
    assert len(bomb.getvalue()) < 1_000_000
    _problem(wrn.post("/v1/metrics", content=bomb.getvalue(), headers=NPZ), 413, "uncompressed")
    assert wrn.get("/healthz").status_code == 200


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_are_read_exactly_and_a_damaged_member_is_refused(compressed):
    """Stored members are read in place in the body (CRC-checked, as zipfile checks them), compressed ones
    through zipfile: the same arrays either way, writable, and one flipped data byte is a 400."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((500, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=500)
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, logits=logits, labels=labels)
    body = buffer.getvalue()
    arrays = tensors.decode_npz(body, max_bytes=1 << 20)
    np.testing.assert_array_equal(arrays["logits"], logits)
    np.testing.assert_array_equal(arrays["labels"], labels)
    assert arrays["logits"].flags.writeable and arrays["logits"].flags.c_contiguous
    if not compressed:
        damaged = bytearray(body)
        damaged[body.index(logits.tobytes()[:64]) + 100] ^= 0x40
        with pytest.raises(InvalidInput, match="CRC"):
            tensors.decode_npz(bytes(damaged), max_bytes=1 << 20)
