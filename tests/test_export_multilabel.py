"""Export of a multi-label model's calibration to TorchScript: the file answers what the numpy transform
answers (to 1e-6), per label, for each multi-label method; without a calibrator, the sigmoid."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from scipy.special import expit

from service.core.calibrators import PerLabelCalibration, calibrator_from_dict
from service.export import EXPORT_METADATA_FILE, export_torchscript
from tests.helpers.multilabel import multilabel_set
from tests.helpers.servers import Server


def _load(data: bytes):
    extra = {EXPORT_METADATA_FILE: ""}
    module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXPORT_METADATA_FILE])


def _new_logits() -> np.ndarray:
    logits, _ = multilabel_set(300, seed=2)
    extreme = np.array([[1e4, -1e4, 0.0, 800.0, -800.0], [1e200, -1e200, 1e-300, 0.5, -0.5]])
    return np.vstack([logits, extreme])


@pytest.mark.parametrize("method", ["temperature", "shared_temperature", "platt", "isotonic"])
def test_every_multilabel_method_exports_its_transform(method):
    logits, labels = multilabel_set(800, seed=0)
    fitted = PerLabelCalibration(method).fit(logits, labels)
    module, metadata = _load(export_torchscript(fitted, metadata={"task": "multilabel"}))
    assert metadata == {"task": "multilabel"}
    new = _new_logits()
    with torch.no_grad():
        exported = module(torch.as_tensor(new)).numpy()
        single = module(torch.as_tensor(new[:300], dtype=torch.float32)).numpy()
    assert exported.dtype == np.float64 and exported.shape == new.shape
    np.testing.assert_allclose(exported, fitted.transform(new), atol=1e-6, rtol=0)
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, fitted.transform(new[:300].astype(np.float32)), atol=1e-6, rtol=0)


def test_without_a_calibrator_the_export_is_the_sigmoid():
    module, _ = _load(export_torchscript(None, metadata={"task": "multilabel"}))
    new = _new_logits()
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.as_tensor(new)).numpy(), expit(new), atol=1e-12)


def test_the_service_exports_the_active_multilabel_calibrator(tmp_path):
    logits, labels = multilabel_set(600, seed=0)
    with Server(tmp_path / "store") as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.put("/v1/models/tags", json={"num_classes": 5, "task": "multilabel"}).status_code == 201
        fitted = http.post(
            "/v1/models/tags/fit",
            json={"logits": logits.tolist(), "labels": labels.tolist(), "method": "platt"},
        )
        assert fitted.status_code == 201, fitted.text
        answer = http.get("/v1/models/tags/export")
        assert answer.status_code == 200, answer.text
    module, metadata = _load(answer.content)
    assert metadata["task"] == "multilabel" and metadata["calibrator_version"] == 1
    new = _new_logits()
    with torch.no_grad():
        exported = module(torch.as_tensor(new)).numpy()
    np.testing.assert_allclose(
        exported, calibrator_from_dict(fitted.json()).transform(new), atol=1e-6, rtol=0
    )


def test_a_row_beyond_the_logit_domain_leaves_the_other_rows_of_its_batch_alone():
    """Regression: ``into_domain`` scaled every row of a batch by 2**332 when one row exceeded 1e100, so the
    exported softmax answered one-hot rows for ordinary logits beside it."""
    from service.core.calibrators.torch_modules import SoftmaxModule
    from service.core.probability import softmax

    logits = np.array([[1.0, 2.0, 0.5], [1e200, 0.0, -1e200]])
    module = torch.jit.script(SoftmaxModule())
    with torch.no_grad():
        answer = module(torch.as_tensor(logits)).numpy()
    np.testing.assert_allclose(answer, [softmax(logits[:1])[0], [1.0, 0.0, 0.0]], atol=1e-12)
