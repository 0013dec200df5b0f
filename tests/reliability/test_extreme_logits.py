"""Extreme but finite logits through every method and every serving path: finite rows that sum to 1, never NaN.

Paths: the library's ``transform``, ``POST /v1/models/{name}/calibrate`` with a JSON body and with an
``.npy`` body, ``POST /v2/models/{name}/infer`` (Open Inference Protocol, FP64), and the TorchScript module of
:mod:`service.export` on float64 and float32 logits.

The rule (``service.core.validation.MAX_ABS_LOGIT`` = 1e100, the input domain of every fit and transform):
- rows within it give finite rows summing to 1 on every path;
- a row beyond it (1e300, 1.7e308) is scaled into the domain by a power of two before it is calibrated, on
  every path alike (``validation.scale_into_domain``, and ``torch_modules.into_domain`` in the exported
  module): finite rows that sum to 1, the HTTP answers equal to the library's. Fits and evaluations
  refuse such rows instead (InvalidInput naming the row): figures of them would mean nothing. float32
  logits never leave the domain (float32 ends at 3.4e38).

Before the fix, an uploaded temperature of 2e-300 (and bounds down to 1e-300) made ``[1e99, 0, -1e99]``
answer ``[[null, null, null]]`` with status 200.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import create_app
from service.config import Settings
from service.core import calibrators
from service.core.calibrators.torch_modules import DOMAIN_LIMIT
from service.core.validation import MAX_ABS_LOGIT
from service.errors import InvalidInput
from service.export import export_torchscript
from tests.helpers.arrays import npy

METHODS = tuple(calibrators.CALIBRATORS)
EXTREMES = [
    0.0,
    1.0,
    -1.0,
    5e-324,
    1e4,
    -1e4,
    3.4e38,
    -3.4e38,
    1e99,
    -1e99,
    MAX_ABS_LOGIT,
    -MAX_ABS_LOGIT,
    1e101,
    1e300,
    -1e300,
    1.7976931348623157e308,
    -1.7976931348623157e308,
]


def columns(method: str) -> int:
    return 1 if calibrators.CALIBRATORS[method]._binary_only else 3


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, calibrators.BaseCalibrator]:
    """One calibrator per method, fitted on spread logits; temperature at its smallest allowed T (1e-3),
    where ``z / T`` is largest."""
    rng = np.random.default_rng(7)
    out = {}
    for method in METHODS:
        k = columns(method)
        logits = rng.normal(size=(400, k)) * 4
        labels = rng.integers(0, 2 if k == 1 else k, size=400)
        options = {"bounds": [1e-3, 2e-3]} if method == "temperature" else {}
        out[method] = calibrators.make_calibrator(method, **options).fit(logits, labels)
    assert out["temperature"].temperature_ <= 2e-3
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, fitted) -> TestClient:
    """The real app with one model per method, each serving the fitted calibrator as an uploaded document."""
    root = tmp_path_factory.mktemp("extreme")
    client = TestClient(
        create_app(Settings(store_dir=root / "store", models_dir=root / "models", device="cpu")),
        raise_server_exceptions=False,
    )
    client.__enter__()
    for method, calibrator in fitted.items():
        classes = 2 if columns(method) == 1 else columns(method)
        assert client.put(f"/v1/models/{method}", json={"num_classes": classes}).status_code == 201
        upload = client.post(f"/v1/models/{method}/calibrators", json=calibrator.to_dict())
        assert upload.status_code in (200, 201), upload.text
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def modules(fitted) -> dict[str, torch.jit.ScriptModule]:
    return {
        method: torch.jit.load(io.BytesIO(export_torchscript(calibrator, metadata={})), map_location="cpu")
        for method, calibrator in fitted.items()
        if type(calibrator).torch_module is not calibrators.BaseCalibrator.torch_module  # exportable
    }


def logit_rows(k: int) -> st.SearchStrategy[np.ndarray]:
    # about half the rows stay within the domain (answered), the others hold a value beyond it (refused)
    moderate = st.floats(-50, 50)
    value = st.one_of(st.sampled_from(EXTREMES), moderate, moderate, moderate, st.floats(-1e308, 1e308))
    return st.lists(st.lists(value, min_size=k, max_size=k), min_size=1, max_size=4).map(
        lambda rows: np.array(rows, dtype=np.float64)
    )


def assert_rows(probabilities, n: int) -> None:
    p = np.asarray(probabilities, dtype=np.float64)
    assert p.shape[0] == n and p.shape[1] >= 2
    assert np.isfinite(p).all(), p
    assert (p >= 0).all() and (p <= 1).all(), p
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def first_outside(z: np.ndarray) -> int | None:
    outside = np.flatnonzero((np.abs(z) > MAX_ABS_LOGIT).any(axis=1))
    return int(outside[0]) if outside.size else None


def test_the_module_domain_is_the_service_domain():
    assert DOMAIN_LIMIT == MAX_ABS_LOGIT


@pytest.mark.parametrize("method", METHODS)
def test_every_path_answers_finite_rows_or_names_the_row(method, fitted, served, modules):
    calibrator, module, k = fitted[method], modules.get(method), columns(method)

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(z=logit_rows(k))
    def check(z: np.ndarray) -> None:
        n, row = z.shape[0], first_outside(z)

        # the library
        library = calibrator.transform(z)
        assert_rows(library, n)
        if row is not None:  # fitting on such rows is refused, naming the first
            with pytest.raises(InvalidInput) as refused:
                type(calibrator)().fit(z, np.zeros(n, dtype=int))
            assert refused.value.row == row and f"row {row}" in str(refused.value)

        # v1 JSON and .npy, OIP JSON FP64
        answers = [
            served.post(f"/v1/models/{method}/calibrate", json={"logits": z.tolist()}),
            served.post(
                f"/v1/models/{method}/calibrate",
                content=npy(z),
                headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"},
            ),
            served.post(
                f"/v2/models/{method}/infer",
                json={
                    "inputs": [
                        {
                            "name": "logits",
                            "shape": list(z.shape),
                            "datatype": "FP64",
                            "data": z.ravel().tolist(),
                        }
                    ]
                },
            ),
        ]
        for path, response in zip(("json", "npy", "oip"), answers, strict=True):
            assert response.status_code == 200, (path, response.text)
            if path == "json":
                probabilities = response.json()["probabilities"]
            elif path == "npy":
                probabilities = np.load(io.BytesIO(response.content), allow_pickle=False)
            else:
                (output,) = response.json()["outputs"]
                probabilities = np.reshape(output["data"], output["shape"])
            assert_rows(probabilities, n)
            np.testing.assert_allclose(probabilities, library, rtol=1e-9, atol=1e-12)

        if module is None:  # a method without an export (segment_temperature)
            return
        # the exported module: float64 (scaled into the domain where needed) and float32 where z fits it
        assert_rows(module(torch.from_numpy(z)).numpy(), n)
        if np.abs(z).max() < 3.4e38:
            assert_rows(module(torch.from_numpy(z.astype(np.float32))).numpy(), n)
        if row is None:
            np.testing.assert_allclose(
                module(torch.from_numpy(z)).numpy(), calibrator.transform(z), atol=1e-9
            )

    check()
    assert served.get("/healthz").status_code == 200


def test_the_reported_request_answers_finite_probabilities(served):
    """The issue's example: ``[1e99, 0, -1e99]`` through the smallest temperature allowed."""
    response = served.post("/v1/models/temperature/calibrate", json={"logits": [[1e99, 0.0, -1e99]]})
    assert response.status_code == 200, response.text
    assert response.json()["probabilities"] == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("row", [[1e300, 0.0, -1e300], [-1e300, 1e300, 5.0], [1.7e308, -1.7e308, 0.0]])
def test_logits_near_float64s_end_are_answered_by_every_method(served, row):
    for method in METHODS:
        z = row if columns(method) == 3 else row[:2]
        response = served.post(f"/v1/models/{method}/calibrate", json={"logits": [z]})
        assert response.status_code == 200, (method, response.text)
        assert_rows(response.json()["probabilities"], 1)
