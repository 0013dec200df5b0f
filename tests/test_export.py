"""service.export without HTTP: every method's own torch module, scripted, gives its numpy transform."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from service.core.calibrators import CALIBRATORS, METHODS, calibrator_module, make_calibrator
from service.core.probability import softmax
from service.errors import InvalidInput
from service.export import EXPORT_METADATA_FILE, export_torchscript


def _load(data: bytes):
    extra = {EXPORT_METADATA_FILE: ""}
    module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXPORT_METADATA_FILE])


def _data(n_columns: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((600, n_columns)) * 2.0).astype(np.float32)
    labels = rng.integers(0, max(n_columns, 2), size=600)
    return logits, labels


@pytest.mark.parametrize("n_columns", [1, 2, 5])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_its_transform(method, n_columns):
    if CALIBRATORS[method]._binary_only and n_columns > 2:
        pytest.skip(f"{method} is binary only")
    logits, labels = _data(n_columns)
    calibrator = make_calibrator(method).fit(logits, labels)
    if method == "segment_temperature":  # a row's temperature hangs on a key that is not in its logits
        with pytest.raises(InvalidInput, match="'segment_temperature' cannot be exported to TorchScript"):
            export_torchscript(calibrator, metadata={"method": method})
        return
    module, metadata = _load(export_torchscript(calibrator, metadata={"method": method}))
    assert metadata == {"method": method}
    with torch.no_grad():
        exported64 = module(torch.from_numpy(logits.astype(np.float64))).numpy()
        exported32 = module(torch.from_numpy(logits)).numpy()
    assert exported64.dtype == np.float64 and exported32.dtype == np.float32
    np.testing.assert_allclose(
        exported64, calibrator.transform(logits), rtol=1e-12, atol=1e-12
    )  # float64 probabilities in [0, 1]


def test_no_calibrator_exports_the_plain_softmax():
    logits, _ = _data(4)
    module, _ = _load(export_torchscript(None))
    with torch.no_grad():
        exported = module(torch.from_numpy(logits.astype(np.float64))).numpy()
    np.testing.assert_allclose(exported, softmax(logits), rtol=1e-12, atol=1e-12)  # float64 probabilities


def test_a_calibrator_without_a_torch_module_is_refused():
    class Foreign:
        method = "foreign"

    with pytest.raises(InvalidInput, match="'foreign' cannot be exported"):
        calibrator_module(Foreign())
