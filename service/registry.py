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

A TorchScript file is code. Shipped models (the models directory, part of the image) are trusted. Uploads are
not: before any of their code runs, :func:`vet_archive` refuses a file whose loading would run code, and
:func:`vet_functions` refuses every operation outside an allow-list of pure tensor operations (files,
process-wide state, asynchronous work, custom classes), naming it. Every forward pass, smoke checks
included, runs on the model's own threads under a time limit (:class:`ModelRunner`): a model that stalls
answers :class:`ModelTimeout` and cannot take the server's threads. Uploads still belong behind the
``admin`` role.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import re
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from service.core.calibrators import calibrator_module
from service.errors import InvalidInput, MissingDependency, ModelFailed, ModelTimeout, NotFound
from service.lazy import lazy_module
from service.names import validate_model_name as check_model_name

if TYPE_CHECKING:
    import torch
else:  # imported by the first model load: a logits-only or proxy deployment never pays for it
    torch = lazy_module("torch", globals(), needed_for="a TorchScript model")

logger = logging.getLogger("calibserve.registry")

MODEL_FILE = "model.pt"
METADATA_FILE = "model.json"
FAILURE_THRESHOLD = 3
DEFAULT_TIMEOUT_S = 10.0
MODEL_THREADS = 4
T = TypeVar("T")
INPUT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:i"`` to a usable :class:`torch.device`.

    ``"auto"`` is CUDA device 0 when CUDA is available, else the CPU. Asking for CUDA where there is none, or
    for a CUDA index that does not exist, raises InvalidInput rather than failing later at the first load.
    """
    if not isinstance(device, str) and isinstance(device, torch.device):
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
    task: str | None = None  # "multilabel" where the metadata declares K independent sigmoid outputs
    stamp: Any = None
    runner: ModelRunner | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class _Metadata:
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    input_dtype: str
    class_names: tuple[str, ...] | None
    description: str | None
    task: str | None = None


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
    task = metadata.get("task")
    if task is not None:
        from service.core.multilabel import check_task

        task = check_task(task)
    return _Metadata(num_classes, input_shape, input_dtype, class_names, description, task)


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
    timeout : float, default=DEFAULT_TIMEOUT_S
        Seconds a forward pass (or a smoke check) may run before ModelTimeout; see :class:`ModelRunner`.

    Notes
    -----
    Loaded models are swapped in by one dictionary assignment under a lock, so a reader sees either the old
    model or the new one, never a half-loaded one; a file that fails its checks never replaces a good model.
    :meth:`predict` (= :meth:`prepare` + :meth:`run`) is synchronous (call it from a thread pool in async
    code).
    """

    def __init__(
        self,
        models_dir: Path | str | None,
        *,
        device: str | torch.device = "auto",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._device_spec = device
        self._device: torch.device | None = None
        if not (isinstance(device, str) and device.strip().lower() in ("auto", "cpu")):
            self._device = resolve_device(device)  # a CUDA device that does not exist fails here, not later
        self.timeout = float(timeout)
        self._models: dict[str, LoadedModel] = {}
        self._load_failures: dict[str, str] = {}
        self._load_timeouts: set[str] = set()
        self._inference_failures: dict[str, str] = {}
        self._consecutive_failures: dict[str, int] = {}
        self._device_calibrators: dict[tuple[int, torch.device], tuple[Any, torch.nn.Module]] = {}
        self._lock = threading.Lock()
        self._ready = False

    # ------------------------------------------------------------------------------------------- loading

    @property
    def device(self) -> torch.device:
        """Where models run, resolved (importing torch) by the first load."""
        if self._device is None:
            self._device = resolve_device(self._device_spec)
        return self._device

    @property
    def ready(self) -> bool:
        """True once :meth:`load_all` has run (whatever the outcome for each model)."""
        return self._ready

    def load_all(self) -> None:
        """Load every ``models_dir/<name>/model.pt``; a model that fails is recorded, not raised.

        Directories whose name is not a valid model name, or without ``model.pt``, are skipped with a log
        line. Models installed from elsewhere (uploads, :meth:`load_file`) are kept. Shipped models are
        trusted (not vetted); their smoke checks still run under the time limit.
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
                model = self.load_file(name, model_path, metadata, trusted=True)
            except (InvalidInput, OSError, MissingDependency) as exc:
                self.record_load_failure(name, exc)
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

    def declared_without_file(self) -> dict[str, dict[str, Any]]:
        """``{name: metadata}`` of the models directory's folders with a ``model.json`` and no ``model.pt``
        (models served elsewhere, e.g. by an upstream inference server); unreadable ones are logged."""
        declared: dict[str, dict[str, Any]] = {}
        if self.models_dir is None or not self.models_dir.is_dir():
            return declared
        for directory in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            if (directory / MODEL_FILE).exists() or not (directory / METADATA_FILE).is_file():
                continue
            try:
                check_model_name(directory.name)
                metadata = self._read_metadata(directory / METADATA_FILE)
            except (InvalidInput, OSError) as exc:
                logger.warning("skipping model directory %s: %s", directory, exc)
                continue
            if metadata is not None:
                declared[directory.name] = metadata
        return declared

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

    def record_load_failure(self, name: str, exc: BaseException) -> None:
        """Remember that model ``name`` failed to load (listed by :meth:`failing`; :meth:`get` raises it)."""
        reason = str(exc)
        logger.warning("model %s failed to load: %s", name, reason)
        with self._lock:
            self._load_failures[name] = reason
            if isinstance(exc, SmokeCheckTimeout):
                self._load_timeouts.add(name)
            else:
                self._load_timeouts.discard(name)

    def load_file(
        self, name: str, path: Path | str, metadata: Mapping[str, Any] | None = None, *, trusted: bool = False
    ) -> LoadedModel:
        """Load the TorchScript file at ``path`` as ``name``: :meth:`check_bytes`, then :meth:`install`.

        The file must load with ``torch.jit.load``; when ``input_shape`` is known, a zero batch
        ``(1, *input_shape)`` must give one finite row of logits whose width matches ``num_classes``. Any
        failure raises InvalidInput and leaves the previous model of that name in place. Untrusted files
        (the default) are vetted first, as :meth:`check_bytes` says.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read model file {path}: {exc.strerror or exc}") from None
        return self.install(self.check_bytes(name, data, metadata, source=path, trusted=trusted))

    def check_bytes(
        self,
        name: str,
        data: bytes,
        metadata: Mapping[str, Any] | None = None,
        *,
        source: Path | None = None,
        trusted: bool = False,
    ) -> LoadedModel:
        """Load and smoke-check a TorchScript file's bytes without making them model ``name`` yet.

        The HTTP upload checks first, then writes the file to the store, then :meth:`install` s it: a file
        that fails, or a store that cannot be written, leaves the serving model untouched. Unless
        ``trusted``, the file is vetted before any of its code runs (:func:`vet_archive` before loading,
        :func:`vet_functions` before the smoke check): a refused operation is InvalidInput naming it. A
        smoke check that runs past the time limit is :class:`SmokeCheckTimeout` (an InvalidInput).
        """
        check_model_name(name)
        meta = _parse_metadata(name, metadata)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput(f"model {name!r}: expected the bytes of a TorchScript file")
        if len(data) == 0:
            raise InvalidInput(f"model {name!r}: not a TorchScript file: the file is empty")
        data = bytes(data)
        if not trusted:
            vet_archive(name, data)
        try:
            # What torch.jit.load does, keeping the compilation unit: it holds every function of the file.
            unit = torch._C.CompilationUnit()
            cpp_module = torch._C.import_ir_module_from_buffer(unit, data, self.device, {}, False)
            module = torch.jit._recursive.wrap_cpp_module(cpp_module)
        except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors... for bad files
            raise InvalidInput(
                f"model {name!r}: not a TorchScript file: {_first_line(exc)} "
                "(export with torch.jit.script or torch.jit.trace, then torch.jit.save; "
                "torch.save checkpoints and state_dicts are not TorchScript)"
            ) from None
        if not trusted:
            vet_functions(name, unit.get_functions())
        module.eval()
        runner = ModelRunner(name, timeout=self.timeout, threads=MODEL_THREADS)

        output_columns = None
        num_classes = meta.num_classes
        if meta.input_shape is not None:
            output_columns = self._smoke_check(name, module, meta, runner)
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
            runner=runner,
            task=meta.task,
        )
        return model

    def install(self, model: LoadedModel) -> LoadedModel:
        """Make a checked model serve under its name (one dictionary assignment under the lock)."""
        name = model.name
        self._runner(model)
        with self._lock:
            self._models[name] = model
            self._load_failures.pop(name, None)
            self._load_timeouts.discard(name)
            self._inference_failures.pop(name, None)
            self._consecutive_failures.pop(name, None)
        return model

    def _smoke_check(
        self, name: str, module: torch.jit.ScriptModule, meta: _Metadata, runner: ModelRunner
    ) -> int:
        """Run a zero batch through a freshly loaded module, on its runner; return its number of logit
        columns."""
        assert meta.input_shape is not None
        probe = torch.zeros(
            (1, *meta.input_shape), dtype=getattr(torch, meta.input_dtype), device=self.device
        )

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return _check_output(name, module(probe), 1, None)

        try:
            output = runner.call(forward)
        except ModelTimeout:
            raise SmokeCheckTimeout(
                f"model {name!r} failed its smoke check: it did not answer a zero input of shape "
                f"{tuple(probe.shape)} within {self.timeout:g} s (CALIBSERVE_MODEL_TIMEOUT_S)"
            ) from None
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
            timed_out = name in self._load_timeouts
        if model is not None:
            return model
        if load_failure is not None:
            raise (ModelTimeout if timed_out else ModelFailed)(
                f"model {name!r} failed to load: {load_failure}"
            )
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
            self._load_timeouts.discard(name)
            self._inference_failures.pop(name, None)
            self._consecutive_failures.pop(name, None)
        if not known:
            raise NotFound(f"no TorchScript model named {name!r}")

    def failing(self) -> dict[str, str]:
        """Models that failed to load, failed ``FAILURE_THRESHOLD`` inferences in a row, or are stalled (a
        forward pass ran past the time limit and has not returned): name -> reason."""
        with self._lock:
            reasons = {name: f"failed to load: {reason}" for name, reason in self._load_failures.items()}
            for name, reason in self._inference_failures.items():
                count = self._consecutive_failures.get(name, 0)
                reasons[name] = f"{count} consecutive inference failures, last: {reason}"
            models = list(self._models.values())
        for model in models:
            stalled = model.runner.stall_reason() if model.runner is not None else None
            if stalled is not None:
                reasons[model.name] = stalled
        return dict(sorted(reasons.items()))

    @staticmethod
    def stalled() -> dict[str, str]:
        """Forward passes (smoke checks included) past the time limit that have not returned, in this
        process: model name -> what they hold. Each keeps one thread busy until it returns, also when its
        model was replaced, refused or removed since."""
        return stalled_passes()

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

        The pass runs on the model's own threads and waits at most the registry's ``timeout``
        (:class:`ModelRunner`): past it, or while the model is stalled, ModelTimeout.
        """
        return self._runner(model).wait(self.submit(model, batch, calibrator))

    def submit(
        self, model: LoadedModel, batch: np.ndarray, calibrator: torch.nn.Module | None = None
    ) -> Future:
        """:meth:`run` without the wait: the future of ``(logits, probabilities)``, computed on the model's
        own threads. Whoever waits for it (e.g. an event loop, holding no thread) waits :attr:`timeout`
        at most, then calls :meth:`expire`. ModelTimeout at once while the model is stalled."""

        def forward() -> tuple[np.ndarray, np.ndarray | None]:
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
                    # When no conversion was needed, the memory is the model's (possibly a buffer, or the
                    # input batch itself): hand out a copy, never an alias.
                    array = logits.numpy()
                    if logits.data_ptr() == output.data_ptr():
                        array = array.copy()
            except ModelFailed as exc:
                self._record_failure(model, str(exc))
                raise
            self._record_success(model)
            return array, probabilities

        return self._runner(model).submit(forward)

    def expire(self, model: LoadedModel, future: Future) -> ModelTimeout | None:
        """The ModelTimeout for a :meth:`submit` ted pass whose wait ran out, marking the model stalled if
        it is still running; None if it finished meanwhile (take its result). See :class:`ModelRunner`."""
        return self._runner(model).expire(future)

    def _runner(self, model: LoadedModel) -> ModelRunner:
        if model.runner is None:  # installed without one (not through check_bytes)
            model.runner = ModelRunner(model.name, timeout=self.timeout, threads=MODEL_THREADS)
        return model.runner

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
        dtype = INPUT_DTYPES[model.input_dtype]
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
# Vetting untrusted TorchScript (uploads)
#
# A TorchScript file is code: ``torch.save``, ``torch.from_file`` and friends compile, and a file's
# ``__setstate__`` runs while ``torch.jit.load`` unpickles it. Uploads are therefore checked in two steps
# before any of their code runs: the archive (no ``__setstate__``, no C++ custom classes) before loading,
# then every compiled function's graph against an allow-list, before the smoke check.
#
# The rule: a node is allowed when it is an ``aten::`` operator outside DENIED_ATEN, or a ``prim::`` node in
# ALLOWED_PRIM; every other namespace (``quantized::``, ``c10d::`` and ``_c10d_functional::`` (network),
# ``profiler::``, ``prim::rpc_*``, custom classes...) is refused. How DENIED_ATEN was enumerated, on
# torch 2.13's ``torch._C._jit_get_all_schemas()`` (3754 ``aten::`` schemas):
#   * operators taking a file name: of the ``str`` arguments that are not a mode, an enum-like choice or an
#     operand of a string method, only ``aten::save(t item, str filename)`` and
#     ``aten::from_file(str filename, ...)`` name a path;
#   * operators that return nothing and write no tensor argument act through side effects only: besides
#     assertions, sparse-argument validation and ``aten::warn`` (a Python warning), those are ``_print``
#     (stdout), ``manual_seed`` (the process-wide RNG), ``_cufft_set_plan_cache_max_size`` and
#     ``_cufft_clear_plan_cache`` (process-wide caches), ``backward``/``_backward`` (autograd) and
#     ``dist_backward`` (distributed autograd over RPC);
#   * ``aten::seed`` reseeds the process-wide RNG, ``aten::wait`` waits on a future (with ``prim::fork``, code
#     that would run outside the model's own time-limited thread), ``aten::record_stream`` and the
#     ``_cufft_get_*`` readers touch process-wide device state.
# There is no sleep, process, socket or environment operator in ``aten::``. The ``prim::`` list is what
# scripted and traced models of torch.nn (linear, convolutional, recurrent and transformer layers,
# ``torch.no_grad()``, control flow, lists, dicts, tuples, optionals, user classes) compile to, and the
# tensor-property queries; it leaves out ``prim::Print`` (writes to the server's stdout: forged log lines),
# ``prim::PythonOp``, ``prim::fork``/``prim::awaitable*`` (work outside the model's thread), ``prim::rpc_*``,
# ``prim::TimePoint``/``prim::AddStatValue`` and the optimiser's internal nodes. ``prim::SetAttr`` stays: it
# changes the model's own objects (``torch.no_grad()`` uses it), nothing outside them.
# Memory use is not bounded by this check: a model may still allocate what the device has.
DENIED_ATEN = frozenset(
    {
        "aten::save",
        "aten::from_file",
        "aten::_print",
        "aten::manual_seed",
        "aten::seed",
        "aten::_cufft_set_plan_cache_max_size",
        "aten::_cufft_clear_plan_cache",
        "aten::_cufft_get_plan_cache_max_size",
        "aten::_cufft_get_plan_cache_size",
        "aten::backward",
        "aten::_backward",
        "aten::dist_backward",
        "aten::wait",
        "aten::record_stream",
    }
)
ALLOWED_PRIM = frozenset(
    "prim::" + kind
    for kind in (
        # values, containers and control flow
        "Constant", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleUnpack", "TupleIndex",
        "TupleSlice", "DictConstruct", "DictIndex", "If", "Loop", "Uninitialized", "unchecked_cast",
        "unchecked_unwrap_optional", "isinstance", "RaiseException", "NumToTensor", "ImplicitTensorToNum",
        "StringIndex", "ListIndex", "tolist", "rangelist", "min", "max", "abs", "index", "id",
        "EnumName", "EnumValue", "ModuleContainerIndex", "ConstantChunk", "BroadcastSizes", "ChunkSizes",
        # modules, objects and calls (every callee is vetted too: all functions of the file are)
        "GetAttr", "SetAttr", "CreateObject", "CallMethod", "CallFunction", "Enter", "Exit",
        # tensor properties
        "device", "dtype", "layout", "type", "data", "requires_grad", "grad", "name", "nbytes",
        "itemsize", "is_cpu", "is_cuda", "is_xpu", "is_mps", "is_meta", "is_mkldnn", "is_nested",
        "is_quantized", "is_sparse", "is_sparse_csr", "is_vulkan", "is_xla", "is_ipu", "is_maia",
        "is_mtia",
    )
)  # fmt: skip
_CUSTOM_CLASS_PREFIX = "__torch__.torch.classes."
_REFUSED_IN_ARCHIVE = {
    b"__setstate__": "a __setstate__ method (it would run while the file loads)",
    b"torch.classes.": "a C++ custom class (torch.classes)",
}


def vet_archive(name: str, data: bytes) -> None:
    """Refuse a TorchScript archive whose loading itself would run code: a ``__setstate__`` method (run by
    ``torch.jit.load`` on unpickling) or a C++ custom class (whose own ``__setstate__`` runs then).

    Every entry is read as Python's ``zipfile`` decompresses it, except the debug tables (source text for
    error messages, never compiled). Names repeated up to case are refused, so that torch's zip reader
    (which looks entries up case-insensitively) cannot be given an entry this check did not read.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            seen: set[str] = set()
            for info in infos:
                key = info.filename.lower()
                if key in seen:
                    raise InvalidInput(
                        f"model {name!r}: not a TorchScript file: the archive holds {info.filename!r} twice"
                    )
                seen.add(key)
            for info in infos:
                if info.filename.lower().endswith(".debug_pkl"):
                    continue
                what = _refused_content(archive, info)
                if what is not None:
                    raise InvalidInput(
                        f"model {name!r} is refused: it holds {what}; uploaded models may only use "
                        "pure tensor operations",
                        field="body",
                    )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(
            f"model {name!r}: not a TorchScript file: not a readable zip archive ({_first_line(exc)}) "
            "(export with torch.jit.script or torch.jit.trace, then torch.jit.save)"
        ) from None


def _refused_content(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """What of :data:`_REFUSED_IN_ARCHIVE` an entry holds, read in chunks (a large or highly compressed
    entry is never held whole), with an overlap so that no needle is missed across a chunk boundary."""
    overlap = max(len(needle) for needle in _REFUSED_IN_ARCHIVE) - 1
    tail = b""
    with archive.open(info) as entry:
        while chunk := entry.read(1 << 20):
            window = tail + chunk
            for needle, what in _REFUSED_IN_ARCHIVE.items():
                if needle in window:
                    return what
            tail = window[-overlap:]
    return None


def refused_operation(node: Any) -> str | None:
    """Why ``node`` (a TorchScript graph node) may not run in an uploaded model, or None if it may."""
    kind = node.kind()
    if kind.startswith("aten::"):
        if kind in DENIED_ATEN:
            return f"operation {kind} (file, process-wide state or asynchronous work)"
    elif kind not in ALLOWED_PRIM:
        return f"operation {kind} (not a pure tensor operation)"
    for value in (*node.inputs(), *node.outputs()):
        value_type = value.type()
        if isinstance(value_type, torch._C.ClassType) and value_type.qualified_name().startswith(
            _CUSTOM_CLASS_PREFIX
        ):
            return f"C++ custom class {value_type.qualified_name()} (in {kind})"
    return None


def vet_functions(name: str, functions: Any) -> None:
    """Refuse the first node of any of ``functions`` (every function compiled from the file: methods of
    every module and class, hooks, free functions) that :func:`refused_operation` refuses, naming it."""
    for function in functions:
        blocks = [function.graph.block()]
        while blocks:
            for node in blocks.pop().nodes():
                reason = refused_operation(node)
                if reason is not None:
                    raise InvalidInput(
                        f"model {name!r} is refused: {function.qualified_name} uses {reason}; uploaded "
                        "models may only use pure tensor operations",
                        field="body",
                    )
                blocks.extend(node.blocks())


# --------------------------------------------------------------------------------------------------------
# Time-limited forward passes


class ModelRunner:
    """The threads that run one model's forward passes (and its smoke check), each under a time limit.

    A call waits at most ``timeout`` seconds. A forward pass that runs past it cannot be stopped (a
    thread stuck in TorchScript or C++ cannot be killed from Python): it keeps one of this model's own
    threads, never one of the server's, and the model is *stalled* until that pass returns: every call
    answers :class:`ModelTimeout` at once instead of queueing more work behind it, so a model that loops
    or blocks forever costs its ``threads`` threads, not the worker. Threads are daemons (a stuck one does
    not keep the process from exiting) and leave after a minute without work.
    """

    IDLE_EXIT_S = 60.0

    def __init__(self, name: str, *, timeout: float, threads: int = 4) -> None:
        self.name = name
        self.timeout = timeout
        self.max_threads = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._overdue: dict[int, float] = {}  # id of a forward pass past its limit -> when it started

    @property
    def stalled(self) -> bool:
        return bool(self._overdue)

    def stall_reason(self) -> str | None:
        """Why this model is stalled, or None."""
        with self._lock:
            if not self._overdue:
                return None
            count, since = len(self._overdue), min(self._overdue.values())
        return (
            f"stalled: {count} forward pass(es) ran past the {self.timeout:g} s limit "
            f"(CALIBSERVE_MODEL_TIMEOUT_S), still running after {time.monotonic() - since:.1f} s"
        )

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on one of this model's threads; ModelTimeout past the limit or when stalled."""
        return self.wait(self.submit(function, *args))

    def wait(self, future: Future) -> Any:
        """The result of a :meth:`submit` ted call, waiting :attr:`timeout` at most (then :meth:`expire`)."""
        try:
            return future.result(self.timeout)
        except (FutureTimeout, CancelledError):  # cancelled: dropped from the queue by a stall
            pass
        error = self.expire(future)
        if error is None:
            return future.result()
        raise error

    def submit(self, function: Callable[..., T], *args: Any) -> Future:
        """Queue ``function(*args)`` for this model's threads: the future of its answer. Whoever waits for
        it waits :attr:`timeout` at most, then calls :meth:`expire`. ModelTimeout at once when stalled."""
        if self._overdue:
            raise ModelTimeout(f"model {self.name!r} is {self.stall_reason() or 'stalled'}")
        job = _Job()
        with self._lock:
            self._jobs.put((job, function, args))
            if self._jobs.qsize() > self._idle and self._threads < self.max_threads:
                self._threads += 1
                threading.Thread(target=self._work, name=f"model-{self.name}", daemon=True).start()
        return job

    def expire(self, future: Future) -> ModelTimeout | None:
        """The error for a call whose wait for ``future`` ran out (None if it finished meanwhile: take its
        result). A call still queued is dropped; one still running marks the model stalled until it
        returns, and drops the calls queued behind it."""
        if future.cancel():  # it had not started
            if isinstance(future, _Job) and future.dropped:
                return ModelTimeout(f"model {self.name!r} is {self.stall_reason() or 'stalled'}")
            return ModelTimeout(
                f"model {self.name!r} did not start within {self.timeout:g} s (CALIBSERVE_MODEL_TIMEOUT_S): "
                "its threads were busy with other forward passes"
            )
        with self._lock:
            if not future.done():
                started = future.started if isinstance(future, _Job) else 0.0
                self._overdue[id(future)] = started or time.monotonic() - self.timeout
                with _OVERDUE_LOCK:
                    _OVERDUE[id(future)] = (self.name, self._overdue[id(future)])
                self._drop_queued()
        future.add_done_callback(self._returned)  # at once if it returned meanwhile
        if future.done():
            return None
        logger.warning(
            "model %s stalled: a forward pass ran past %g s (CALIBSERVE_MODEL_TIMEOUT_S)",
            self.name,
            self.timeout,
        )
        return ModelTimeout(
            f"model {self.name!r} did not answer within {self.timeout:g} s (CALIBSERVE_MODEL_TIMEOUT_S); "
            "it is marked stalled until that forward pass returns"
        )

    def _drop_queued(self) -> None:
        """Cancel the calls still queued (their callers answer ModelTimeout at once); under the lock."""
        kept = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            job[0].dropped = True
            if not job[0].cancel():
                kept.append(job)
        for job in kept:
            self._jobs.put(job)

    def _returned(self, future: Future) -> None:
        with self._lock:
            was_overdue = self._overdue.pop(id(future), None) is not None
            with _OVERDUE_LOCK:
                _OVERDUE.pop(id(future), None)
            recovered = was_overdue and not self._overdue
        if recovered:
            logger.info("model %s: its stalled forward pass returned", self.name)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._jobs.empty():
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            future, function, args = job
            if not future.set_running_or_notify_cancel():
                continue
            future.started = time.monotonic()
            try:
                result = function(*args)
            except BaseException as exc:  # handed to the caller, as the thread pool would
                future.set_exception(exc)
            else:
                future.set_result(result)
            del job, future, function, args


# Every forward pass past its limit in this process (id of its future -> model name, start): what
# /healthz reports. A process-wide table, as the threads they hold are the process's.
_OVERDUE: dict[int, tuple[str, float]] = {}
_OVERDUE_LOCK = threading.Lock()


def stalled_passes() -> dict[str, str]:
    """Forward passes past their time limit still running in this process: model name -> description."""
    if not _OVERDUE:  # the common case, without the lock
        return {}
    now = time.monotonic()
    by_model: dict[str, list[float]] = {}
    with _OVERDUE_LOCK:
        for name, started in _OVERDUE.values():
            by_model.setdefault(name, []).append(started)
    return {
        name: f"{len(starts)} forward pass(es) past the time limit, the oldest running for "
        f"{now - min(starts):.1f} s, each holding one thread"
        for name, starts in sorted(by_model.items())
    }


class _Job(Future):
    """A call queued on a :class:`ModelRunner`: when it started running, whether a stall dropped it."""

    started = 0.0
    dropped = False


class SmokeCheckTimeout(InvalidInput):
    """A file's smoke check ran past the time limit: the upload is refused (400) like any failed check;
    a stored model that fails so at start-up answers :class:`ModelTimeout` (504)."""


# --------------------------------------------------------------------------------------------------------
# TorchScript for service.export (this module is the only one that calls torch's jit)


def exported(method: Any) -> Any:
    """``method`` of a module marked for :func:`script_module` to compile beside ``forward``
    (``torch.jit.export``), so that callers of the file can run it by name."""
    return torch.jit.export(method)


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
