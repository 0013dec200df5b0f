"""ModelRegistry against real TorchScript files: tiny scripted modules built here, and the shipped digits-mlp."""

from __future__ import annotations

import ast
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service import registry as registry_module
from service.core.calibrators import make_calibrator
from service.core.probability import softmax
from service.errors import InvalidInput, ModelFailed, NotFound
from service.registry import (
    FAILURE_THRESHOLD,
    LoadedModel,
    ModelRegistry,
    check_model_name,
    resolve_device,
)
from tests.helpers.data import DIGITS_DIR, DIGITS_LOGIT_ULPS, REPO, SHIPPED_MODELS
from tests.helpers.numerics import assert_float32_close, float32_tolerance
from tests.helpers.torchscript import Linear, scripted

SHIPPED = SHIPPED_MODELS
DIGITS = DIGITS_DIR
DIGITS_ULPS = DIGITS_LOGIT_ULPS  # see tests/helpers/data.py and the shipped-model test
# The tiny modules' logits are length-4 dot products plus a bias; scripted and eager modules, or CPU and GPU,
# may take different kernels (fused addmm or not): a few ulps of the row's largest logit.
SMALL_ULPS = 8

# TorchScript is deprecated upstream in favour of torch.export, but it is the model format calibserve serves.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

# TorchScript reads no module globals: the modules below spell these numbers out.
N_FEATURES = 4
N_CLASSES = 3


# ---------------------------------------------------------------------------------------------- models


class RaisesOnLargeInput(nn.Module):
    """Fine on zeros (passes the smoke check), raises when any input exceeds 100."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights in every run
        self.layer = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100.0).any()):
            raise RuntimeError("activation overflow in layer 2")
        return self.layer(x)


class AlwaysRaises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("weights were never initialised")


class DropsRows(nn.Module):
    """Returns one row whatever the batch: right on the smoke check's single row, wrong on larger batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, 3) + x[:1, :3]


class NaNOnNegativeFirstFeature(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x[:, :3] * 2.0
        return torch.where(x[:, :1] < 0, torch.full_like(logits, float("nan")), logits)


class InfOnLargeInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x[:, :3].clone()
        return torch.where(x[:, :1] > 100.0, torch.full_like(logits, float("inf")), logits)


class OneDimensional(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1)


class SingleLogit(nn.Module):
    """A binary model: one column, the logit of class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Image(nn.Module):
    """Takes (N, 1, 2, 2) and returns the 4 pixels as logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 4)


def load_bytes(registry: ModelRegistry, name: str, data: bytes, metadata: dict | None = None) -> LoadedModel:
    """Check a TorchScript file's bytes and, if they pass, make them model ``name`` (as an upload does)."""
    return registry.install(registry.check_bytes(name, data, metadata))


SHAPE_META = {"input_shape": [N_FEATURES], "num_classes": N_CLASSES}
INPUTS = np.random.default_rng(0).normal(size=(7, N_FEATURES)).astype(np.float32)


def eager_logits(module: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """Reference: the plain (not scripted) module's output."""
    with torch.no_grad():
        return module(torch.from_numpy(inputs)).numpy()


@pytest.fixture
def registry() -> ModelRegistry:
    return ModelRegistry(None, device="cpu")


@pytest.fixture
def good(registry: ModelRegistry) -> ModelRegistry:
    load_bytes(registry, "good", scripted(Linear(seed=0)), SHAPE_META)
    return registry


# ---------------------------------------------------------------------------------------------- device


def test_device_cpu_and_auto_follow_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert ModelRegistry(None).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_invalid_input(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInput, match="CUDA is not available"):
        ModelRegistry(None, device=device)


def test_cuda_index_out_of_range_names_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidInput, match=r"2 CUDA device\(s\) visible, indices 0\.\.1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["tpu", "mps", "", "cuda:-1", "cuda:x", "gpu"])
def test_unknown_device_is_invalid_input(device: str) -> None:
    with pytest.raises(InvalidInput, match="unknown device"):
        resolve_device(device)


# ------------------------------------------------------------------------------------- shipped model


def test_shipped_digits_model_reproduces_its_stored_logits() -> None:
    registry = ModelRegistry(SHIPPED, device="cpu")
    assert not registry.ready
    registry.load_all()
    assert registry.ready
    assert "digits-mlp" in registry.names()
    assert "digits-mlp" not in registry.failing()
    model = registry.get("digits-mlp")
    assert model.num_classes == 10
    assert model.input_shape == (64,)
    assert model.class_names == tuple(str(k) for k in range(10))
    assert model.source == DIGITS / "model.pt"
    assert DIGITS.joinpath("model.pt").stat().st_size < 100_000

    test = np.load(DIGITS / "test.npz")
    assert test["inputs"].dtype == np.float32 and test["inputs"].shape[1] == 64
    assert test["labels"].dtype == np.int64
    logits = registry.predict("digits-mlp", test["inputs"])
    assert logits.dtype == np.float32 and logits.shape == (test["inputs"].shape[0], 10)
    # A float32 forward pass is not bit-reproducible across CPUs: their SIMD kernels sum the two length-64 dot
    # products in different orders (seen: 4 ulps at |logit| 45 on another machine). Rounding of such a sum
    # grows like sqrt(64) = 8 ulps of the terms' magnitude (~ the row's largest logit); allow twice that.
    assert_float32_close(logits, test["logits"], ulps=DIGITS_ULPS)
    # the stored logits give the recorded accuracy exactly; the served ones the same argmax on every row whose
    # top two stored logits are further apart than that rounding (only a near-tie may flip; here the closest
    # top two are 0.6 apart, so every row counts)
    metadata = json.loads((DIGITS / "model.json").read_text())
    stored_accuracy = float((test["logits"].argmax(axis=1) == test["labels"]).mean())
    assert stored_accuracy == pytest.approx(metadata["training"]["test_accuracy"], abs=1e-6)
    assert stored_accuracy > 0.9
    top_two = np.sort(test["logits"], axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * float32_tolerance(test["logits"], ulps=DIGITS_ULPS)[:, 0]
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(logits.argmax(axis=1)[clear], test["logits"].argmax(axis=1)[clear])


def test_shipped_digits_model_takes_raw_sklearn_pixels() -> None:
    """The model scales by 1/16 itself: load_digits' own rows go in unchanged and the split rows match."""
    from sklearn.datasets import load_digits

    registry = ModelRegistry(SHIPPED, device="cpu")
    registry.load_all()
    digits = load_digits()
    logits = registry.predict("digits-mlp", digits.data)  # float64 0..16, converted to float32
    assert float((logits.argmax(axis=1) == digits.target).mean()) > 0.95
    validation = np.load(DIGITS / "validation.npz")
    assert validation["inputs"].min() >= 0 and validation["inputs"].max() <= 16


def test_shipped_digits_model_is_over_confident_on_validation() -> None:
    """The walkthrough needs something to fix: mean confidence above accuracy, and T > 1 lowers the NLL."""
    from scipy.special import log_softmax

    validation = np.load(DIGITS / "validation.npz")
    logits, labels = validation["logits"].astype(np.float64), validation["labels"]
    probabilities = np.exp(log_softmax(logits, axis=1))
    accuracy = (probabilities.argmax(axis=1) == labels).mean()
    assert probabilities.max(axis=1).mean() > accuracy + 0.01

    def nll(temperature: float) -> float:
        return float(-log_softmax(logits / temperature, axis=1)[np.arange(labels.size), labels].mean())

    assert nll(2.0) < nll(1.0) - 0.03


# ------------------------------------------------------------------------------------------ load_all


def write_model(directory: Path, data: bytes, metadata: dict | str | None = None) -> None:
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(data)
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        (directory / "model.json").write_text(text)


def test_load_all_records_failures_and_loads_the_rest(tmp_path: Path) -> None:
    write_model(tmp_path / "good", scripted(Linear()), {**SHAPE_META, "class_names": ["a", "b", "c"]})
    write_model(tmp_path / "no-metadata", scripted(Linear(seed=1)))
    write_model(tmp_path / "corrupt", b"\x00not a model" * 10)
    write_model(tmp_path / "bad-json", scripted(Linear()), "{not json")
    write_model(tmp_path / "flat-output", scripted(OneDimensional()), SHAPE_META)
    write_model(tmp_path / "bad name", scripted(Linear()))
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "stray.txt").write_text("not a model directory")

    registry = ModelRegistry(tmp_path, device="cpu")
    registry.load_all()

    assert registry.ready
    assert registry.names() == ["good", "no-metadata"]
    failing = registry.failing()
    assert sorted(failing) == ["bad-json", "corrupt", "flat-output"]
    assert "not a TorchScript file" in failing["corrupt"]
    assert "not valid JSON" in failing["bad-json"]
    assert "1-D" in failing["flat-output"] and "smoke check" in failing["flat-output"]
    good = registry.get("good")
    assert good.class_names == ("a", "b", "c") and good.description is None
    untyped = registry.get("no-metadata")
    assert untyped.num_classes is None and untyped.input_shape is None
    assert_float32_close(
        registry.predict("no-metadata", INPUTS), eager_logits(Linear(seed=1), INPUTS), ulps=SMALL_ULPS
    )
    with pytest.raises(ModelFailed, match="'corrupt' failed to load"):
        registry.predict("corrupt", INPUTS)


def test_load_all_without_models_dir_is_ready_and_empty(tmp_path: Path) -> None:
    for models_dir in (None, tmp_path / "missing"):
        registry = ModelRegistry(models_dir, device="cpu")
        registry.load_all()
        assert registry.ready and registry.names() == [] and registry.failing() == {}


def test_load_all_keeps_uploaded_models(tmp_path: Path) -> None:
    write_model(tmp_path / "shipped", scripted(Linear()), SHAPE_META)
    registry = ModelRegistry(tmp_path, device="cpu")
    load_bytes(registry, "uploaded", scripted(Linear(seed=2)), SHAPE_META)
    registry.load_all()
    assert registry.names() == ["shipped", "uploaded"]


# --------------------------------------------------------------------------------------- good models


def test_predict_matches_the_eager_module(good: ModelRegistry) -> None:
    logits = good.predict("good", INPUTS)
    assert logits.dtype == np.float32 and logits.shape == (7, N_CLASSES)
    assert_float32_close(logits, eager_logits(Linear(seed=0), INPUTS), ulps=SMALL_ULPS)
    model = good.get("good")
    assert model.num_classes == N_CLASSES and model.output_columns == N_CLASSES
    assert model.device == torch.device("cpu") and model.source is None
    assert not model.module.training


def test_num_classes_comes_from_the_smoke_check_when_metadata_lacks_it(registry: ModelRegistry) -> None:
    model = load_bytes(registry, "five", scripted(Linear(n_out=5)), {"input_shape": [N_FEATURES]})
    assert model.num_classes == 5 and model.output_columns == 5
    model = load_bytes(registry, "named", scripted(Linear()), {"class_names": ["x", "y", "z"]})
    assert model.num_classes == 3


def test_single_logit_column_is_a_binary_model(registry: ModelRegistry) -> None:
    model = load_bytes(registry, "binary", scripted(SingleLogit()), {"input_shape": [N_FEATURES]})
    assert model.num_classes == 2 and model.output_columns == 1
    load_bytes(registry, "binary2", scripted(SingleLogit()), {"input_shape": [N_FEATURES], "num_classes": 2})
    # a float32 sum of 4 terms: a few ulps of the terms' magnitude, which cancellation can leave above the sum's
    exact = INPUTS.astype(np.float64).sum(axis=1)
    scale = np.abs(INPUTS).sum(axis=1)
    assert_float32_close(registry.predict("binary2", INPUTS)[:, 0], exact, ulps=4, scale=scale)
    with pytest.raises(InvalidInput, match="returns 1 logit columns but its metadata says num_classes=3"):
        load_bytes(registry, "binary3", scripted(SingleLogit()), SHAPE_META)


def test_load_file_records_its_source(registry: ModelRegistry, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(scripted(Linear()))
    model = registry.load_file("from-file", path, SHAPE_META)
    assert model.source == path
    with pytest.raises(InvalidInput, match="cannot read model file"):
        registry.load_file("missing", tmp_path / "nope.pt")
    assert "missing" not in registry.names()


def test_predict_returns_memory_of_its_own(registry: ModelRegistry) -> None:
    """An identity model hands back its input tensor; the caller's array must not alias the result."""
    load_bytes(registry, "identity", scripted(Identity()), {"input_shape": [N_FEATURES]})
    inputs = INPUTS.copy()
    logits = registry.predict("identity", inputs)
    np.testing.assert_array_equal(logits, INPUTS)
    logits[:] = 0.0
    np.testing.assert_array_equal(inputs, INPUTS)


def test_multi_dimensional_inputs_accept_the_flat_form(registry: ModelRegistry) -> None:
    load_bytes(registry, "image", scripted(Image()), {"input_shape": [1, 2, 2]})
    pixels = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(registry.predict("image", pixels.reshape(2, 1, 2, 2)), pixels)
    np.testing.assert_array_equal(registry.predict("image", pixels), pixels)
    with pytest.raises(InvalidInput, match=r"takes \(n_samples, 1, 2, 2\)"):
        registry.predict("image", np.zeros((2, 5), dtype=np.float32))


# ------------------------------------------------------------------------------------ corrupt uploads


def _zip_that_is_not_torchscript() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.txt", "hello")
    return buffer.getvalue()


def _state_dict_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save(Linear(seed=5).state_dict(), buffer)
    return buffer.getvalue()


CORRUPT_UPLOADS = {
    "random bytes": lambda good: np.random.default_rng(1).bytes(2048),
    "truncated model file": lambda good: good[: len(good) // 2],
    "last bytes cut": lambda good: good[:-40],
    "zip that is not TorchScript": lambda good: _zip_that_is_not_torchscript(),
    "torch.save state_dict": lambda good: _state_dict_checkpoint(),
    "empty": lambda good: b"",
    "json text": lambda good: b'{"weights": [1, 2, 3]}',
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_UPLOADS))
def test_corrupt_upload_is_invalid_and_keeps_the_old_model(good: ModelRegistry, kind: str) -> None:
    before = good.predict("good", INPUTS)
    old = good.get("good")
    data = CORRUPT_UPLOADS[kind](scripted(Linear(seed=9)))
    with pytest.raises(InvalidInput, match="'good': not a TorchScript file") as caught:
        load_bytes(good, "good", data, SHAPE_META)
    assert "miniz" not in str(caught.value)
    assert good.get("good") is old
    np.testing.assert_array_equal(good.predict("good", INPUTS), before)
    assert good.failing() == {}


@pytest.mark.parametrize(
    ("module", "metadata", "message"),
    [
        (
            AlwaysRaises(),
            SHAPE_META,
            "raised on a zero input of shape \\(1, 4\\): RuntimeError: weights were",
        ),
        (OneDimensional(), SHAPE_META, "1-D tensor of shape \\(1,\\)"),
        (Linear(n_out=4), SHAPE_META, "returns 4 logit columns but its metadata says num_classes=3"),
        (Linear(), {"input_shape": [5]}, "mat1 and mat2 shapes cannot be multiplied"),
        (Linear(), {**SHAPE_META, "class_names": ["a", "b"]}, "2 class_names but num_classes is 3"),
    ],
    ids=["raises", "1-D", "class count", "input shape", "class names"],
)
def test_upload_failing_its_checks_keeps_the_old_model(
    good: ModelRegistry, module: nn.Module, metadata: dict, message: str
) -> None:
    before = good.predict("good", INPUTS)
    with pytest.raises(InvalidInput, match=message):
        load_bytes(good, "good", scripted(module), metadata)
    np.testing.assert_array_equal(good.predict("good", INPUTS), before)


def test_smoke_check_catches_nan_on_zero_input(registry: ModelRegistry) -> None:
    class NaNOnZero(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x[:, :3]) - torch.log(x[:, :3])

    with pytest.raises(InvalidInput, match="smoke check on a zero input: model 'nan' returned NaN at row 0"):
        load_bytes(registry, "nan", scripted(NaNOnZero()), SHAPE_META)
    assert registry.names() == []


def test_replacing_a_model_serves_the_new_one(good: ModelRegistry) -> None:
    load_bytes(good, "good", scripted(Linear(seed=7)), SHAPE_META)
    assert_float32_close(good.predict("good", INPUTS), eager_logits(Linear(seed=7), INPUTS), ulps=SMALL_ULPS)


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"num_classes": "3"}, "num_classes"),
        ({"input_shape": []}, "input_shape"),
        ({"input_shape": [4, 0]}, "input_shape"),
        ({"input_shape": "4"}, "input_shape"),
        ({"input_dtype": "int8"}, "input_dtype"),
        ({"class_names": [1, 2, 3]}, "class_names"),
        ({"description": 5}, "description"),
    ],
)
def test_bad_metadata_is_invalid_input(registry: ModelRegistry, metadata: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_bytes(registry, "m", scripted(Linear()), metadata)
    assert caught.value.field == field
    assert registry.names() == []


def test_unknown_metadata_keys_are_ignored(registry: ModelRegistry) -> None:
    metadata = {**SHAPE_META, "training": {"epochs": 3}, "created_at": "2025-01-01", "input_shape": [4]}
    assert load_bytes(registry, "m", scripted(Linear()), metadata).num_classes == N_CLASSES


# ------------------------------------------------------------------------------------ model failures


def test_model_that_raises_is_model_failed_with_its_message(registry: ModelRegistry) -> None:
    load_bytes(registry, "raiser", scripted(RaisesOnLargeInput()), SHAPE_META)
    registry.predict("raiser", INPUTS)  # fine on ordinary inputs
    with pytest.raises(
        ModelFailed, match="model 'raiser' raised: RuntimeError: activation overflow in layer 2"
    ):
        registry.predict("raiser", INPUTS + 1000.0)


def test_nan_output_names_the_row(registry: ModelRegistry) -> None:
    load_bytes(registry, "nan", scripted(NaNOnNegativeFirstFeature()), SHAPE_META)
    inputs = np.abs(INPUTS)
    inputs[3, 0] = -1.0
    inputs[5, 0] = -1.0
    with pytest.raises(ModelFailed, match=r"model 'nan' returned NaN at row 3$"):
        registry.predict("nan", inputs)


def test_inf_output_names_the_row(registry: ModelRegistry) -> None:
    load_bytes(registry, "inf", scripted(InfOnLargeInput()), SHAPE_META)
    inputs = INPUTS.copy()
    inputs[6, 0] = 500.0
    with pytest.raises(ModelFailed, match=r"model 'inf' returned Inf at row 6$"):
        registry.predict("inf", inputs)


def test_wrong_row_count_is_model_failed(registry: ModelRegistry) -> None:
    load_bytes(registry, "drops", scripted(DropsRows()), SHAPE_META)
    assert registry.predict("drops", INPUTS[:1]).shape == (1, N_CLASSES)
    with pytest.raises(ModelFailed, match="model 'drops' returned 1 rows of logits for 7 input rows"):
        registry.predict("drops", INPUTS)


def test_shapes_unchecked_at_load_are_checked_at_inference(registry: ModelRegistry) -> None:
    """Without input_shape there is no smoke check; predict still catches the model's bad output."""
    load_bytes(registry, "flat", scripted(OneDimensional()))
    with pytest.raises(ModelFailed, match=r"model 'flat' returned a 1-D tensor of shape \(7,\)"):
        registry.predict("flat", INPUTS)
    load_bytes(registry, "wide", scripted(Linear(n_out=5)), {"num_classes": 3})
    with pytest.raises(ModelFailed, match="model 'wide' returned 5 logit columns, expected 3"):
        registry.predict("wide", INPUTS)


def test_failing_after_consecutive_failures_and_recovery(registry: ModelRegistry) -> None:
    load_bytes(registry, "raiser", scripted(RaisesOnLargeInput()), SHAPE_META)
    for _ in range(FAILURE_THRESHOLD - 1):
        with pytest.raises(ModelFailed):
            registry.predict("raiser", INPUTS + 1000.0)
    assert registry.failing() == {}
    registry.predict("raiser", INPUTS)  # a success resets the count
    for _ in range(FAILURE_THRESHOLD - 1):
        with pytest.raises(ModelFailed):
            registry.predict("raiser", INPUTS + 1000.0)
    assert registry.failing() == {}
    with pytest.raises(ModelFailed):
        registry.predict("raiser", INPUTS + 1000.0)
    failing = registry.failing()
    assert list(failing) == ["raiser"]
    assert f"{FAILURE_THRESHOLD} consecutive inference failures" in failing["raiser"]
    assert "activation overflow" in failing["raiser"]
    assert registry.names() == ["raiser"]  # still served: it may recover

    # the caller's bad inputs are not the model's fault
    with pytest.raises(InvalidInput):
        registry.predict("raiser", np.full((2, N_FEATURES), np.nan))
    assert "raiser" in registry.failing()

    registry.predict("raiser", INPUTS)
    assert registry.failing() == {}


def test_replacing_a_failing_model_clears_its_record(registry: ModelRegistry) -> None:
    load_bytes(registry, "raiser", scripted(RaisesOnLargeInput()), SHAPE_META)
    for _ in range(FAILURE_THRESHOLD):
        with pytest.raises(ModelFailed):
            registry.predict("raiser", INPUTS + 1000.0)
    assert "raiser" in registry.failing()
    load_bytes(registry, "raiser", scripted(Linear()), SHAPE_META)
    assert registry.failing() == {}


def test_replacing_a_load_failure_clears_it(tmp_path: Path) -> None:
    write_model(tmp_path / "later-fixed", b"garbage")
    registry = ModelRegistry(tmp_path, device="cpu")
    registry.load_all()
    assert list(registry.failing()) == ["later-fixed"]
    load_bytes(registry, "later-fixed", scripted(Linear()), SHAPE_META)
    assert registry.failing() == {} and registry.names() == ["later-fixed"]


# -------------------------------------------------------------------------------------- caller errors


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.zeros((0, N_FEATURES), dtype=np.float32), "inputs is empty"),
        (np.zeros(N_FEATURES, dtype=np.float32), "at least 2-D"),
        (
            np.zeros((2, 5), dtype=np.float32),
            r"inputs has shape \(2, 5\); model 'good' takes \(n_samples, 4\)",
        ),
        (np.zeros((2, 2, 2), dtype=np.float32), r"takes \(n_samples, 4\)"),
        (np.array([["a", "b", "c", "d"]]), "must hold numbers"),
        (np.ones((2, N_FEATURES), dtype=bool), "must hold numbers"),
        ([[1.0, 2.0], [3.0]], "not a rectangular numeric array"),
        (np.full((3, N_FEATURES), 1e300), "row 0 holds a value too large for float32"),
    ],
)
def test_bad_inputs_are_invalid_input(good: ModelRegistry, inputs: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        good.predict("good", inputs)
    assert good.failing() == {}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_name_the_row(good: ModelRegistry, bad: float) -> None:
    inputs = INPUTS.astype(np.float64)
    inputs[4, 2] = bad
    with pytest.raises(InvalidInput, match="inputs contains NaN or Inf at row 4") as caught:
        good.predict("good", inputs)
    assert caught.value.row == 4


def test_inputs_are_converted_to_the_declared_dtype(registry: ModelRegistry) -> None:
    class DtypeProbe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float64:
                raise RuntimeError("expected float64")
            return x.float()

    load_bytes(
        registry, "f64", scripted(DtypeProbe()), {"input_shape": [N_FEATURES], "input_dtype": "float64"}
    )
    np.testing.assert_array_equal(registry.predict("f64", INPUTS.tolist()), INPUTS)
    np.testing.assert_array_equal(registry.predict("f64", np.ones((2, N_FEATURES), dtype=np.int64)), 1.0)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "a\\b", "a\x00", "a\n", "-lead", "x" * 65, "é", "a b", 7]
)
def test_invalid_names_are_rejected_everywhere(registry: ModelRegistry, name: object) -> None:
    with pytest.raises(InvalidInput, match="invalid model name"):
        check_model_name(name)
    with pytest.raises(InvalidInput, match="invalid model name"):
        load_bytes(registry, name, scripted(Linear()))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="invalid model name"):
        registry.get(name)  # type: ignore[arg-type]
    assert registry.names() == []


@pytest.mark.parametrize("name", ["a", "A.b_c-d", "0", "x" * 64, "v1.2..3"])
def test_valid_names(name: str) -> None:
    assert check_model_name(name) == name


def test_unknown_names_and_remove(good: ModelRegistry) -> None:
    with pytest.raises(NotFound, match="no TorchScript model named 'other'"):
        good.get("other")
    with pytest.raises(NotFound):
        good.predict("other", INPUTS)
    assert good.loaded("other") is None and good.loaded("good") is good.get("good")
    assert "good" in good and "other" not in good
    good.remove("good")
    assert good.names() == [] and "good" not in good
    with pytest.raises(NotFound):
        good.get("good")
    with pytest.raises(NotFound):
        good.remove("good")


def test_stamp_is_the_callers_marker(good: ModelRegistry) -> None:
    model = good.get("good")
    assert model.stamp is None
    model.stamp = 12345
    assert good.loaded("good").stamp == 12345  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------- threads


def test_concurrent_predictions_during_swaps_see_one_whole_model(registry: ModelRegistry) -> None:
    """Readers racing with replacements get either model's exact answer, never an error or a mix."""
    first, second = scripted(Linear(seed=0)), scripted(Linear(seed=1))
    expected = [eager_logits(Linear(seed=0), INPUTS), eager_logits(Linear(seed=1), INPUTS)]
    load_bytes(registry, "swap", first, SHAPE_META)

    def swap(i: int) -> None:
        load_bytes(registry, "swap", second if i % 2 else first, SHAPE_META)

    with ThreadPoolExecutor(max_workers=4) as pool:
        swaps = [pool.submit(swap, i) for i in range(10)]
        answers = [pool.submit(registry.predict, "swap", INPUTS) for _ in range(60)]
        for future in swaps:
            future.result()
        results = [future.result() for future in answers]
    # the two models' outputs differ by O(1): a reader's answer is exactly one model's, up to float32 rounding
    tolerances = [float32_tolerance(option, ulps=SMALL_ULPS) for option in expected]
    assert np.abs(expected[0] - expected[1]).max() > 0.1
    for result in results:
        assert any(
            (np.abs(result - option) <= tolerance).all()
            for option, tolerance in zip(expected, tolerances, strict=True)
        )
    assert registry.failing() == {}


def _uses_torch_jit(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        attribute = (
            isinstance(node, ast.Attribute)
            and node.attr == "jit"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        )
        plain_import = isinstance(node, ast.Import) and any(
            a.name.startswith("torch.jit") for a in node.names
        )
        from_import = (
            isinstance(node, ast.ImportFrom)
            and node.module is not None
            and (
                node.module.startswith("torch.jit")
                or (node.module == "torch" and any(a.name == "jit" for a in node.names))
            )
        )
        if attribute or plain_import or from_import:
            return True
    return False


def test_registry_is_the_only_module_calling_torch_jit() -> None:
    assert _uses_torch_jit("import torch\ntorch.jit.load('x')")
    assert _uses_torch_jit("from torch import jit")
    assert _uses_torch_jit("import torch.jit")
    assert not _uses_torch_jit('"""torch.jit in a docstring"""')
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "service").rglob("*.py"))
        if path != Path(registry_module.__file__) and _uses_torch_jit(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


# ------------------------------------------------------------------------------ calibration on device


def _fitted_calibrators() -> list:
    with np.load(DIGITS / "validation.npz") as validation:
        logits, labels = validation["logits"], validation["labels"]
    return [None] + [
        make_calibrator(method).fit(logits, labels)
        for method in ("temperature", "vector", "matrix", "isotonic", "histogram")
    ]


def _calibration_on_device_equals_numpy(device: str) -> None:
    models = ModelRegistry(SHIPPED, device=device)
    models.load_all()
    model, batch = models.prepare("digits-mlp", np.load(DIGITS / "test.npz")["inputs"])
    cpu_logits = ModelRegistry(SHIPPED, device="cpu")
    cpu_logits.load_all()
    logits = cpu_logits.predict("digits-mlp", batch)
    for calibrator in _fitted_calibrators():
        module = models.calibrator_on_device(model, calibrator)
        assert models.calibrator_on_device(model, calibrator) is module  # built once
        assert all(buffer.device.type == model.device.type for buffer in module.buffers())
        run_logits, probabilities = models.run(model, batch, module)
        method = getattr(calibrator, "method", "softmax")
        # another device runs the forward pass with its own kernels: equal up to float32 rounding
        assert_float32_close(run_logits, logits, ulps=DIGITS_ULPS, err_msg=method)
        # calibrated from the logits that device produced, in float64: the figures and the argmax the CPU path
        # gives for those same logits (exp and log on a GPU differ from numpy's by an ulp or two of float64)
        expected = softmax(run_logits) if calibrator is None else calibrator.transform(run_logits)
        assert probabilities.dtype == np.float64
        np.testing.assert_allclose(probabilities, expected, rtol=1e-12, atol=1e-15, err_msg=method)
        np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))


def test_calibration_after_the_forward_pass_equals_numpy_calibration() -> None:
    # The GPU path of /predict; on the CPU it runs the same modules.
    _calibration_on_device_equals_numpy("cpu")


class _FailingCalibration(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (as a GPU would say)")


def test_a_calibration_that_fails_on_the_device_leaves_it_to_the_cpu(good: ModelRegistry) -> None:
    model, batch = good.prepare("good", INPUTS)
    logits, probabilities = good.run(model, batch, _FailingCalibration())
    assert probabilities is None  # the caller calibrates on the CPU; the model is not blamed
    assert_float32_close(logits, eager_logits(Linear(), INPUTS), ulps=SMALL_ULPS)
    assert good.failing() == {}


def test_run_without_calibrator_gives_logits_only(good: ModelRegistry) -> None:
    model, batch = good.prepare("good", INPUTS)
    logits, probabilities = good.run(model, batch)
    assert probabilities is None
    assert_float32_close(logits, eager_logits(Linear(), INPUTS), ulps=SMALL_ULPS)


# -------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_predictions_equal_cpu() -> None:
    cpu = ModelRegistry(SHIPPED, device="cpu")
    gpu = ModelRegistry(SHIPPED, device="cuda")
    cpu.load_all()
    gpu.load_all()
    model = gpu.get("digits-mlp")
    assert model.device.type == "cuda"
    assert next(model.module.parameters()).device.type == "cuda"
    inputs = np.load(DIGITS / "test.npz")["inputs"]
    on_gpu = gpu.predict("digits-mlp", inputs)
    assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == np.float32
    assert_float32_close(on_gpu, cpu.predict("digits-mlp", inputs), ulps=DIGITS_ULPS)
    load_bytes(gpu, "small", scripted(Linear()), SHAPE_META)
    assert_float32_close(gpu.predict("small", INPUTS), eager_logits(Linear(), INPUTS), ulps=SMALL_ULPS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calibration_after_the_forward_pass_equals_numpy_calibration() -> None:
    _calibration_on_device_equals_numpy("cuda")
