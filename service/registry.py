"""TorchScript model registry: loading, device placement, smoke checks, inference and failure tracking.

This is the only module of calibserve that calls ``torch.jit``. A model is a TorchScript file
(``torch.jit.script`` or ``torch.jit.trace``) mapping a float batch ``(N, *input_shape)`` to logits ``(N, K)``,
with optional metadata (``model.json`` beside a shipped model, or the store's record for an uploaded one):

``num_classes``
    Number of classes. The model returns ``num_classes`` logit columns, or one column for a binary model
    (the logit of class 1, so ``num_classes`` is 2), as everywhere in calibserve.
``input_shape``
    Shape of one sample, e.g. ``[64]``. When known, every load runs a smoke check (a zero batch of shape
    ``(1, *input_shape)`` must give one finite row of logits) and ``predict`` checks its inputs against it.
``input_dtype``
    ``float32`` (default), ``float64`` or ``float16``: what ``predict`` converts its inputs to.
``class_names``, ``description``
    Passed through for the API.

Faults are split by whose they are: bad files and bad inputs are the caller's (:class:`InvalidInput`); a model
that raises, or returns NaN or the wrong shape, is the model's (:class:`ModelFailed`). A model that fails
``FAILURE_THRESHOLD`` times in a row is listed by :meth:`ModelRegistry.failing` until it succeeds again.

Loading a TorchScript file runs no Python from it, but it is still code from whoever uploaded it: uploads
belong behind the ``admin`` role.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core.calibrators import calibrator_module
from service.errors import InvalidInput, ModelFailed, NotFound
from service.names import validate_model_name as check_model_name

logger = logging.getLogger("calibserve.registry")

MODEL_FILE = "model.pt"
METADATA_FILE = "model.json"
FAILURE_THRESHOLD = 3
INPUT_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float64": (np.dtype(np.float64), torch.float64),
    "float16": (np.dtype(np.float16), torch.float16),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:i"`` to a usable :class:`torch.device`.

    ``"auto"`` is CUDA device 0 when CUDA is available, else the CPU. Asking for CUDA where there is none, or
    for a CUDA index that does not exist, raises InvalidInput rather than failing later at the first load.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise InvalidInput(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
    spec = device.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise InvalidInput(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    if not torch.cuda.is_available():
        raise InvalidInput(
            f"device {device!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use 'cpu' or 'auto'"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidInput(
            f"device {device!r} does not exist: {count} CUDA device(s) visible, indices 0..{count - 1}"
        )
    return torch.device("cuda", index)


@dataclass
class LoadedModel:
    """A TorchScript module in eval mode on its device, with what its metadata and smoke check told us.

    ``num_classes`` is None only when neither the metadata nor a smoke check (which needs ``input_shape``)
    gave it. ``output_columns`` is the number of logit columns the model returns: ``num_classes``, or 1 for
    a single-logit binary model. ``stamp`` is an opaque marker for the caller (e.g. the mtime of the file
    it was loaded from), untouched by the registry.
    """

    name: str
    module: torch.jit.ScriptModule
    device: torch.device
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    description: str | None
    source: Path | None
    input_dtype: str = "float32"
    output_columns: int | None = None
    stamp: Any = None


@dataclass(frozen=True)
class _Metadata:
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    input_dtype: str
    class_names: tuple[str, ...] | None
    description: str | None


def _parse_metadata(name: str, metadata: Mapping[str, Any] | None) -> _Metadata:
    """Validate the keys the registry uses; other keys (training notes, store fields) are ignored."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"metadata of model {name!r} must be a JSON object, got {type(metadata).__name__}")
    num_classes = metadata.get("num_classes")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise InvalidInput(
            f"num_classes of model {name!r} must be a positive integer, got {num_classes!r}",
            field="num_classes",
        )
    input_shape = metadata.get("input_shape")
    if input_shape is not None:
        if (
            not isinstance(input_shape, list | tuple)
            or not input_shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape)
        ):
            raise InvalidInput(
                f"input_shape of model {name!r} must be a non-empty list of positive integers "
                f"(the shape of one sample, e.g. [64]), got {input_shape!r}",
                field="input_shape",
            )
        input_shape = tuple(int(d) for d in input_shape)
    input_dtype = metadata.get("input_dtype") or "float32"
    if input_dtype not in INPUT_DTYPES:
        raise InvalidInput(
            f"input_dtype of model {name!r} must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}",
            field="input_dtype",
        )
    class_names = metadata.get("class_names")
    if class_names is not None:
        if not isinstance(class_names, list | tuple) or not all(isinstance(c, str) for c in class_names):
            raise InvalidInput(
                f"class_names of model {name!r} must be a list of strings", field="class_names"
            )
        class_names = tuple(class_names)
        if num_classes is None:
            num_classes = len(class_names)
        elif len(class_names) != num_classes:
            raise InvalidInput(
                f"model {name!r} has {len(class_names)} class_names but num_classes is {num_classes}",
                field="class_names",
            )
    description = metadata.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidInput(f"description of model {name!r} must be a string", field="description")
    return _Metadata(num_classes, input_shape, input_dtype, class_names, description)


def _columns_fit_classes(columns: int, num_classes: int) -> bool:
    """K logit columns for K classes, or one column for a binary model."""
    return columns == num_classes or (columns == 1 and num_classes == 2)


def _check_output(name: str, output: Any, n_rows: int, expected_columns: int | None) -> torch.Tensor:
    """Raise ModelFailed unless ``output`` is a finite floating ``(n_rows, K)`` tensor (K as expected)."""
    if not isinstance(output, torch.Tensor):
        raise ModelFailed(f"model {name!r} returned {type(output).__name__}, expected a tensor of logits")
    if not output.is_floating_point():
        raise ModelFailed(f"model {name!r} returned dtype {output.dtype}, expected floating-point logits")
    if output.ndim != 2:
        raise ModelFailed(
            f"model {name!r} returned a {output.ndim}-D tensor of shape {tuple(output.shape)}, "
            f"expected 2-D logits ({n_rows}, n_classes)"
        )
    rows, columns = output.shape
    if rows != n_rows:
        raise ModelFailed(f"model {name!r} returned {rows} rows of logits for {n_rows} input rows")
    if columns == 0:
        raise ModelFailed(f"model {name!r} returned logits with 0 columns")
    if expected_columns is not None and columns != expected_columns:
        raise ModelFailed(f"model {name!r} returned {columns} logit columns, expected {expected_columns}")
    finite = torch.isfinite(output)
    if not bool(finite.all()):
        bad_rows = (~finite).any(dim=1)
        row = int(torch.nonzero(bad_rows)[0, 0])
        what = "NaN" if bool(torch.isnan(output[row]).any()) else "Inf"
        raise ModelFailed(f"model {name!r} returned {what} at row {row}")
    return output


class ModelRegistry:
    """TorchScript models by name, on one device, safe to use from several threads.

    Parameters
    ----------
    models_dir : Path or None
        Directory of shipped models, ``models_dir/<name>/model.pt`` (+ optional ``model.json``), read by
        :meth:`load_all`. None: no shipped models (uploads only).
    device : str, default="auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``.
        Unavailable CUDA raises InvalidInput here.

    Notes
    -----
    Loaded models are swapped in by one dictionary assignment under a lock, so a reader sees either the old
    model or the new one, never a half-loaded one; a file that fails its checks never replaces a good model.
    :meth:`predict` (= :meth:`prepare` + :meth:`run`) is synchronous (call it from a thread pool in async
    code).
    """

    def __init__(self, models_dir: Path | str | None, *, device: str | torch.device = "auto") -> None:
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.device = resolve_device(device)
        self._models: dict[str, LoadedModel] = {}
        self._load_failures: dict[str, str] = {}
        self._inference_failures: dict[str, str] = {}
        self._consecutive_failures: dict[str, int] = {}
        self._device_calibrators: dict[tuple[int, torch.device], tuple[Any, torch.nn.Module]] = {}
        self._lock = threading.Lock()
        self._ready = False

    # ------------------------------------------------------------------------------------------- loading

    @property
    def ready(self) -> bool:
        """True once :meth:`load_all` has run (whatever the outcome for each model)."""
        return self._ready

    def load_all(self) -> None:
        """Load every ``models_dir/<name>/model.pt``; a model that fails is recorded, not raised.

        Directories whose name is not a valid model name, or without ``model.pt``, are skipped with a log
        line. Models installed from elsewhere (uploads, :meth:`load_file`) are kept.
        """
        if self.models_dir is None:
            self._ready = True
            return
        if not self.models_dir.is_dir():
            logger.warning("models directory %s does not exist: no shipped models loaded", self.models_dir)
            self._ready = True
            return
        for directory in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            model_path = directory / MODEL_FILE
            if not model_path.is_file():
                logger.debug("skipping %s: no %s", directory, MODEL_FILE)
                continue
            name = directory.name
            try:
                check_model_name(name)
            except InvalidInput as exc:
                logger.warning("skipping model directory %s: %s", directory, exc)
                continue
            try:
                metadata = self._read_metadata(directory / METADATA_FILE)
                model = self.load_file(name, model_path, metadata)
            except (InvalidInput, OSError) as exc:
                reason = str(exc)
                logger.warning("model %s failed to load: %s", name, reason)
                with self._lock:
                    self._load_failures[name] = reason
                continue
            logger.info(
                "loaded model %s from %s on %s (num_classes=%s, input_shape=%s)",
                name,
                model_path,
                model.device,
                model.num_classes,
                model.input_shape,
            )
        self._ready = True

    @staticmethod
    def _read_metadata(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            metadata = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise InvalidInput(f"{path} must hold a JSON object")
        return metadata

    def load_file(
        self, name: str, path: Path | str, metadata: Mapping[str, Any] | None = None
    ) -> LoadedModel:
        """Load the TorchScript file at ``path`` as ``name``: :meth:`check_bytes`, then :meth:`install`.

        The file must load with ``torch.jit.load``; when ``input_shape`` is known, a zero batch
        ``(1, *input_shape)`` must give one finite row of logits whose width matches ``num_classes``. Any
        failure raises InvalidInput and leaves the previous model of that name in place.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read model file {path}: {exc.strerror or exc}") from None
        return self._load(name, data, metadata, source=path)

    def _load(
        self, name: str, data: bytes, metadata: Mapping[str, Any] | None, *, source: Path | None
    ) -> LoadedModel:
        return self.install(self.check_bytes(name, data, metadata, source=source))

    def check_bytes(
        self, name: str, data: bytes, metadata: Mapping[str, Any] | None = None, *, source: Path | None = None
    ) -> LoadedModel:
        """Load and smoke-check a TorchScript file's bytes without making them model ``name`` yet.

        The HTTP upload checks first, then writes the file to the store, then :meth:`install` s it: a file
        that fails, or a store that cannot be written, leaves the serving model untouched.
        """
        check_model_name(name)
        meta = _parse_metadata(name, metadata)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput(f"model {name!r}: expected the bytes of a TorchScript file")
        if len(data) == 0:
            raise InvalidInput(f"model {name!r}: not a TorchScript file: the file is empty")
        try:
            module = torch.jit.load(io.BytesIO(bytes(data)), map_location=self.device)
        except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors... for bad files
            raise InvalidInput(
                f"model {name!r}: not a TorchScript file: {_first_line(exc)} "
                "(export with torch.jit.script or torch.jit.trace, then torch.jit.save; "
                "torch.save checkpoints and state_dicts are not TorchScript)"
            ) from None
        module.eval()

        output_columns = None
        num_classes = meta.num_classes
        if meta.input_shape is not None:
            output_columns = self._smoke_check(name, module, meta)
            if num_classes is None:
                num_classes = 2 if output_columns == 1 else output_columns
        elif num_classes is not None and num_classes != 2:
            output_columns = num_classes  # without a smoke check, 2 classes may come as 1 or 2 columns

        model = LoadedModel(
            name=name,
            module=module,
            device=self.device,
            num_classes=num_classes,
            input_shape=meta.input_shape,
            class_names=meta.class_names,
            description=meta.description,
            source=source,
            input_dtype=meta.input_dtype,
            output_columns=output_columns,
        )
        return model

    def install(self, model: LoadedModel) -> LoadedModel:
        """Make a checked model serve under its name (one dictionary assignment under the lock)."""
        name = model.name
        with self._lock:
            self._models[name] = model
            self._load_failures.pop(name, None)
            self._inference_failures.pop(name, None)
            self._consecutive_failures.pop(name, None)
        return model

    def _smoke_check(self, name: str, module: torch.jit.ScriptModule, meta: _Metadata) -> int:
        """Run a zero batch through a freshly loaded module; return its number of logit columns."""
        assert meta.input_shape is not None
        probe = torch.zeros(
            (1, *meta.input_shape), dtype=INPUT_DTYPES[meta.input_dtype][1], device=self.device
        )
        try:
            with torch.inference_mode():
                output = _check_output(name, module(probe), 1, None)
        except ModelFailed as exc:
            raise InvalidInput(f"model {name!r} failed its smoke check on a zero input: {exc}") from None
        except Exception as exc:  # the module itself raised
            raise InvalidInput(
                f"model {name!r} failed its smoke check: it raised on a zero input of shape "
                f"{tuple(probe.shape)}: {_first_line(exc)}"
            ) from None
        columns = int(output.shape[1])
        if meta.num_classes is not None and not _columns_fit_classes(columns, meta.num_classes):
            raise InvalidInput(
                f"model {name!r} returns {columns} logit columns but its metadata says "
                f"num_classes={meta.num_classes}",
                field="num_classes",
            )
        return columns

    # ----------------------------------------------------------------------------------------- looking up

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name``; NotFound if there is none, ModelFailed if it failed to load."""
        check_model_name(name)
        with self._lock:
            model = self._models.get(name)
            load_failure = self._load_failures.get(name)
        if model is not None:
            return model
        if load_failure is not None:
            raise ModelFailed(f"model {name!r} failed to load: {load_failure}")
        raise NotFound(f"no TorchScript model named {name!r}")

    def loaded(self, name: str) -> LoadedModel | None:
        """The loaded model ``name``, or None (no exceptions: for callers that only peek)."""
        with self._lock:
            return self._models.get(name)

    def names(self) -> list[str]:
        """Names of the loaded models, sorted."""
        with self._lock:
            return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._models

    def remove(self, name: str) -> None:
        """Forget model ``name`` (and its failure record); NotFound if the registry does not know it."""
        check_model_name(name)
        with self._lock:
            known = name in self._models or name in self._load_failures
            self._models.pop(name, None)
            self._load_failures.pop(name, None)
            self._inference_failures.pop(name, None)
            self._consecutive_failures.pop(name, None)
        if not known:
            raise NotFound(f"no TorchScript model named {name!r}")

    def failing(self) -> dict[str, str]:
        """Models that failed to load, or failed ``FAILURE_THRESHOLD`` inferences in a row: name -> reason."""
        with self._lock:
            reasons = {name: f"failed to load: {reason}" for name, reason in self._load_failures.items()}
            for name, reason in self._inference_failures.items():
                count = self._consecutive_failures.get(name, 0)
                reasons[name] = f"{count} consecutive inference failures, last: {reason}"
        return dict(sorted(reasons.items()))

    # ----------------------------------------------------------------------------------------- inference

    def predict(self, name: str, inputs: Any) -> np.ndarray:
        """Logits of model ``name`` for ``inputs``, float32 ``(N, K)`` on the CPU.

        ``inputs`` is ``(N, *input_shape)``, or ``(N, prod(input_shape))`` for a model whose samples have
        several dimensions (reshaped). Bad inputs (NaN/Inf, wrong shape, no rows) raise InvalidInput; a
        model that raises or returns something other than finite ``(N, K)`` logits raises ModelFailed.
        """
        model, batch = self.prepare(name, inputs)
        return self.run(model, batch)[0]

    def prepare(self, name: str, inputs: Any) -> tuple[LoadedModel, np.ndarray]:
        """The model ``name`` and ``inputs`` checked and converted for it: the first half of :meth:`predict`.

        Batches prepared for the same model have the same trailing shape and dtype, so that several can be
        concatenated into one :meth:`run` (dynamic batching).
        """
        model = self.get(name)
        return model, self._check_inputs(model, inputs)

    def run(
        self, model: LoadedModel, batch: np.ndarray, calibrator: torch.nn.Module | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, probabilities)`` of ``model`` for a :meth:`prepare` d batch, both on the CPU.

        With ``calibrator`` (a module from :meth:`calibrator_on_device`) the calibration runs on the
        model's device right after the forward pass, and only the answers travel back; without it, or if
        the calibration fails there (e.g. out of device memory), ``probabilities`` is None and the caller
        calibrates on the CPU.
        """
        try:
            with torch.inference_mode():
                tensor = torch.from_numpy(batch).to(model.device)
                try:
                    output = model.module(tensor)
                except Exception as exc:  # anything the TorchScript code raises is the model's fault
                    raise ModelFailed(f"model {model.name!r} raised: {_first_line(exc)}") from None
                output = _check_output(model.name, output, batch.shape[0], model.output_columns)
                probabilities = _calibrate_on_device(model.name, calibrator, output)
                logits = output.detach().to("cpu", torch.float32)
                # When no conversion was needed, the memory is the model's (possibly a buffer, or the input
                # batch itself): hand out a copy, never an alias.
                array = logits.numpy()
                if logits.data_ptr() == output.data_ptr():
                    array = array.copy()
        except ModelFailed as exc:
            self._record_failure(model, str(exc))
            raise
        self._record_success(model)
        return array, probabilities

    def calibrator_on_device(self, model: LoadedModel, calibrator: Any | None) -> torch.nn.Module | None:
        """:func:`~service.core.calibrators.calibrator_module` of ``calibrator`` (the plain softmax for None)
        on ``model``'s device, built once per calibrator.

        Fitted calibrators are immutable and the serving state keeps one object per version, so the
        object itself is the key (held, so that its ``id`` cannot be reused while cached). None when the
        module cannot be built or moved there (the caller then calibrates on the CPU).
        """
        key = (id(calibrator), model.device)
        with self._lock:
            cached = self._device_calibrators.get(key)
        if cached is not None and cached[0] is calibrator:
            return cached[1]
        try:
            module = calibrator_module(calibrator).to(model.device).eval()
        except Exception as exc:  # e.g. out of device memory: the CPU path calibrates instead
            logger.warning(
                "model %s: calibrator not moved to %s, calibrating on the CPU: %s",
                model.name,
                model.device,
                exc,
            )
            return None
        with self._lock:
            if len(self._device_calibrators) >= 256:
                self._device_calibrators.clear()
            self._device_calibrators[key] = (calibrator, module)
        return module

    def _check_inputs(self, model: LoadedModel, inputs: Any) -> np.ndarray:
        if hasattr(inputs, "detach") and hasattr(inputs, "cpu"):
            inputs = inputs.detach().cpu().numpy()
        try:
            array = np.asarray(inputs)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"inputs is not a rectangular numeric array: {exc}", field="inputs") from None
        if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
            raise InvalidInput(f"inputs must hold numbers, got dtype {array.dtype}", field="inputs")
        if array.ndim < 2:
            raise InvalidInput(
                f"inputs must be a batch (n_samples, ...) of at least 2-D, got shape {array.shape}",
                field="inputs",
            )
        if array.shape[0] == 0:
            raise InvalidInput("inputs is empty: it has no rows", field="inputs")
        if model.input_shape is not None and tuple(array.shape[1:]) != model.input_shape:
            flat = int(np.prod(model.input_shape))
            if array.ndim == 2 and array.shape[1] == flat:
                array = array.reshape((array.shape[0], *model.input_shape))
            else:
                raise InvalidInput(
                    f"inputs has shape {array.shape}; model {model.name!r} takes "
                    f"(n_samples, {', '.join(map(str, model.input_shape))})",
                    field="inputs",
                )
        dtype = INPUT_DTYPES[model.input_dtype][0]
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                row = int(np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))[0])
                raise InvalidInput(f"inputs contains NaN or Inf at row {row}", field="inputs", row=row)
        with np.errstate(over="ignore"):
            converted = np.ascontiguousarray(array, dtype=dtype)
        if not np.isfinite(converted).all():  # e.g. 1e300 does not fit in float32
            row = int(np.flatnonzero(~np.isfinite(converted).reshape(converted.shape[0], -1).all(axis=1))[0])
            raise InvalidInput(
                f"inputs row {row} holds a value too large for {model.input_dtype}", field="inputs", row=row
            )
        return converted

    def _record_failure(self, model: LoadedModel, reason: str) -> None:
        with self._lock:
            if self._models.get(model.name) is not model:  # replaced meanwhile: not the new model's fault
                return
            count = self._consecutive_failures.get(model.name, 0) + 1
            self._consecutive_failures[model.name] = count
            if count >= FAILURE_THRESHOLD:
                if model.name not in self._inference_failures:
                    logger.warning("model %s marked failing after %d failures: %s", model.name, count, reason)
                self._inference_failures[model.name] = reason

    def _record_success(self, model: LoadedModel) -> None:
        if model.name not in self._consecutive_failures:  # the common case, without the lock
            return
        with self._lock:
            if self._models.get(model.name) is not model:
                return
            self._consecutive_failures.pop(model.name, None)
            if self._inference_failures.pop(model.name, None) is not None:
                logger.info("model %s recovered", model.name)


def _calibrate_on_device(
    name: str, calibrator: torch.nn.Module | None, logits: torch.Tensor
) -> np.ndarray | None:
    """``calibrator`` on checked model output, as the CPU path computes it: from the logits rounded to
    float32 (what the CPU path receives), in float64, so that both give the same probabilities and argmax."""
    if calibrator is None:
        return None
    try:
        return calibrator(logits.to(torch.float32).to(torch.float64)).to("cpu").numpy()
    except Exception as exc:  # the CPU path still answers, with the same probabilities
        logger.warning(
            "model %s: calibration on %s failed, calibrating on the CPU: %s", name, logits.device, exc
        )
        return None


def _first_line(exc: BaseException) -> str:
    """The useful line of an exception's message, at most 300 characters.

    Errors raised inside TorchScript carry the interpreter's traceback first and the original error
    (``builtins.RuntimeError: ...``) last; other errors say what happened on their first line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith("The following operation failed in the TorchScript") else lines[0]
    # torch's zip reader appends a paragraph of generic advice after the actual problem.
    line = line.removeprefix("builtins.").split(" This is an internal miniz error")[0]
    return line if len(line) <= 300 else line[:300] + "..."


# --------------------------------------------------------------------------------------------------------
# TorchScript for service.export (this module is the only one that calls torch's jit)


def script_module(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """``module`` compiled to TorchScript; InvalidInput (its first line) when it cannot be."""
    try:
        return torch.jit.script(module)
    except Exception as exc:  # e.g. a model whose TorchScript cannot be embedded
        raise InvalidInput(f"the calibrated module could not be scripted: {_first_line(exc)}") from None


def save_module(module: torch.jit.ScriptModule, extra_files: Mapping[str, str] | None = None) -> bytes:
    """A TorchScript file (bytes) of ``module``, with ``extra_files`` stored beside it by name."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer, _extra_files=dict(extra_files or {}))
    return buffer.getvalue()


def cpu_copy(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A CPU copy of a loaded model's module, in eval mode (the serving module stays where it is)."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    copy = torch.jit.load(buffer, map_location="cpu")
    copy.eval()
    return copy
