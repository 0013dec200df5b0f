"""The Open Inference Protocol's (KServe V2, Triton) use cases, once, for every codec that speaks it.

calibserve answers the protocol over HTTP (:mod:`service.api.routers.oip`) and over gRPC
(:mod:`service.api.grpc`). What a request means is the same on both: which input tensors a model takes
(``logits`` or ``probabilities`` of any model, ``inputs`` of a TorchScript model), which outputs it answers
(``probabilities`` by default, ``logits`` and ``predicted_class`` on request) and in which datatypes, what a
pinned version is, what a model's metadata and readiness say. Those rules live here, over
:class:`~service.serving.dataplane.DataPlane`; a codec only turns its wire format into numpy arrays and
names, calls one function here, and writes the answer back in its own format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata
from typing import Any

import numpy as np

from service import inference_protocol as wire
from service import workflows
from service.errors import CalibserveError, InvalidInput, NotReady, UpstreamFailed
from service.serving.concurrency import in_thread
from service.serving.dataplane import DataPlane, UpstreamPrediction
from service.serving.proxy import logits_output
from service.serving.state import ModelInfo

SERVER_NAME = "calibserve"
INPUT_NAMES = ("logits", "probabilities", "inputs")
OUTPUT_NAMES = ("probabilities", "logits", "predicted_class", "prediction_sets", "probability_intervals")
SETS_OUTPUT = "prediction_sets"
INTERVALS_OUTPUT = "probability_intervals"  # [N, K, 2]: a venn_abers calibrator's [p0, p1], when asked for
"""A version fitted with conformal sets answers this output too (by default, and on request): ``[N, K]``
UINT8, 1 where the class is in the row's set, with ``parameters.alpha``. UINT8 rather than BOOL: the same
0/1 numbers in JSON and in binary (BOOL's JSON form is true/false), one byte a class, and numpy, Triton's
client and torch read it without a cast."""
DEFAULT_OUTPUTS = ("probabilities",)
DATATYPES: dict[str, np.dtype] = {name: wire.NUMPY_TYPES[name] for name in wire.FLOAT_TYPES}
EXTENSIONS = ["binary_tensor_data"]
MAX_VERSIONS_LISTED = 100


# ------------------------------------------------------------------------------------------------ inputs


def input_name(name: Any) -> str:
    """``name`` when it is an input calibserve takes; InvalidInput otherwise."""
    if name not in INPUT_NAMES:
        raise InvalidInput(f"input name must be one of {', '.join(INPUT_NAMES)}, got {name!r}")
    return name


def input_dtype(name: str, datatype: Any) -> np.dtype:
    """The numpy type of an input's ``datatype`` (FP32, FP64 or FP16); InvalidInput for any other."""
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}"
        )
    return DATATYPES[datatype]


def check_input_shape(name: str, values: np.ndarray) -> None:
    """Scores are ``[N, K]``; a TorchScript model's ``inputs`` are a batch ``[N, ...]``."""
    if name != "inputs" and values.ndim != 2:
        raise InvalidInput(f"input {name!r}: shape must be [N, K], got {list(values.shape)}")
    if name == "inputs" and values.ndim < 2:
        raise InvalidInput(f"input 'inputs': shape must be [N, ...] (a batch), got {list(values.shape)}")


def output_name(name: Any) -> str:
    """``name`` when it is an output calibserve answers; InvalidInput otherwise."""
    if name not in OUTPUT_NAMES:
        raise InvalidInput(f"output name must be one of {', '.join(OUTPUT_NAMES)}, got {name!r}")
    return name


def output_datatype(name: str, input_datatype: str) -> str:
    """Classes are INT64; numbers are FP64 when the input was FP64, else FP32 (FP16 is widened: the
    calibrated probabilities are computed in float32 or better and would lose digits)."""
    if name == "predicted_class":
        return "INT64"
    if name == SETS_OUTPUT:
        return "UINT8"
    return "FP64" if input_datatype == "FP64" else "FP32"


# ------------------------------------------------------------------------------------------------- infer


@dataclass(frozen=True, slots=True)
class InferResult:
    """The answer of one inference request: each requested output as ``(datatype, array)``, in the order
    asked for, with the calibrator version that answered and the prediction log's ids (None when off)."""

    outputs: dict[str, tuple[str, np.ndarray]]
    calibrator_version: int | None
    prediction_ids: list[str] | None
    alpha: float | None = None  # the version's conformal alpha, when it answers prediction sets


async def infer(
    plane: DataPlane,
    name: str,
    version: int | None,
    *,
    input_name: str,
    values: np.ndarray,
    datatype: str,
    outputs: Sequence[str] | None = DEFAULT_OUTPUTS,
    seed: int | None = None,
) -> InferResult:
    """Calibrate ``values`` (input ``logits`` or ``probabilities``) or predict (``inputs``) with model
    ``name`` (calibrator ``version``, else the active one), and build the ``outputs`` asked for (None: the
    defaults, with ``prediction_sets`` when the version has conformal sets; ``seed`` draws randomised
    ones)."""
    intervals = outputs is not None and INTERVALS_OUTPUT in outputs
    if input_name == "inputs":
        if intervals:
            raise InvalidInput(
                f"output {INTERVALS_OUTPUT!r} is answered to calibrate requests (input logits or probabilities)"
            )
        prediction = await plane.predict(name, version, values, seed=seed)
        logits = prediction.logits
    else:
        prediction = await plane.calibrate(name, version, input_name, values, seed=seed, intervals=intervals)
        logits = values
    if outputs is None:
        with_sets = (SETS_OUTPUT,) if prediction.prediction_sets is not None else ()
        outputs = (*DEFAULT_OUTPUTS, *with_sets)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for wanted in outputs:
        if wanted == "probabilities":
            array = prediction.probabilities
        elif wanted == "predicted_class":
            array = prediction.predicted_class
        elif wanted == SETS_OUTPUT:
            if prediction.prediction_sets is None:
                raise InvalidInput(
                    f"output {SETS_OUTPUT!r}: calibrator version {prediction.calibrator_version} of model "
                    f"{name!r} has no conformal prediction sets (fit it with conformal)"
                )
            array = prediction.prediction_sets
        elif wanted == INTERVALS_OUTPUT:
            if prediction.intervals is None:
                raise InvalidInput(
                    f"output {INTERVALS_OUTPUT!r}: probability intervals come from a venn_abers calibrator"
                )
            array = prediction.intervals
        elif input_name == "probabilities":  # the logits the calibrator saw
            array = workflows.scores_to_logits(logits, from_logits=False)
        else:
            array = logits
        tensors[wanted] = (output_datatype(wanted, datatype), array)
    ids = prediction.ids.as_list() if prediction.ids is not None else None
    alpha = prediction.alpha if SETS_OUTPUT in tensors else None
    return InferResult(tensors, prediction.calibrator_version, ids, alpha)


# ---------------------------------------------------------------------------------- metadata, readiness


def server_version() -> str:
    try:
        return package_metadata.version("calibserve")
    except package_metadata.PackageNotFoundError:
        return "0"


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


async def server_not_ready(plane: DataPlane) -> str | None:
    """Why the server is not ready (still loading, an upstream server in use not ready), or None."""
    if not plane.ready:
        return "calibserve is loading its models and store"
    try:
        await plane.require_upstreams_ready()
    except NotReady as exc:
        return str(exc)
    return None


def own_model_metadata(info: ModelInfo, versions: list[str], *, with_sets: bool = False) -> dict[str, Any]:
    """Metadata of a model calibserve runs itself (logits-only or TorchScript); ``-1`` where a size is free.
    ``with_sets``: the version that answers has conformal sets (its ``prediction_sets`` output is listed)."""
    columns = info.num_classes if info.num_classes is not None else -1
    multilabel = info.task == "multilabel"  # K labels: K probabilities and a K-column 0/1 predicted_class
    classes = columns if multilabel else 2 if columns == 1 else columns
    inputs = [
        {"name": "logits", "datatype": "FP32", "shape": [-1, columns]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, columns]},
    ]
    if info.kind == "torchscript":
        sample = list(info.input_shape) if info.input_shape else [-1]
        datatype = {"float32": "FP32", "float64": "FP64", "float16": "FP16"}.get(
            info.input_dtype or "", "FP32"
        )
        inputs.insert(0, {"name": "inputs", "datatype": datatype, "shape": [-1, *sample]})
    metadata = {
        "name": info.name,
        "versions": versions,
        "platform": f"calibserve_{info.kind}",
        "inputs": inputs,
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, columns]},
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1, classes] if multilabel else [-1]},
            *([{"name": SETS_OUTPUT, "datatype": "UINT8", "shape": [-1, classes]}] if with_sets else []),
        ],
    }
    if multilabel:
        metadata["parameters"] = {"task": "multilabel"}
    return metadata


def upstream_model_metadata(info: ModelInfo, versions: list[str], upstream: dict[str, Any]) -> dict[str, Any]:
    """The upstream's metadata with calibserve's outputs first and where it comes from under ``parameters``."""
    outputs = [item for item in upstream.get("outputs", []) if isinstance(item, dict)]
    spec = info.upstream
    classes = info.num_classes
    if classes is None:
        try:
            name = logits_output(spec, [str(item.get("name")) for item in outputs]) if spec else None
        except UpstreamFailed:
            name = None
        shapes = [item.get("shape") for item in outputs if item.get("name") == name]
        shape = shapes[0] if shapes else None
        classes = shape[-1] if isinstance(shape, list) and shape and isinstance(shape[-1], int) else -1
    classes = 2 if classes == 1 else classes
    return {
        "name": info.name,
        "versions": versions,
        "platform": "calibserve_upstream",
        "inputs": upstream.get("inputs", []),
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
            *outputs,
        ],
        "parameters": {
            "upstream": {
                **(spec.to_record() if spec is not None else {}),
                "platform": upstream.get("platform"),
                "versions": upstream.get("versions"),
            }
        },
    }


async def model_metadata(plane: DataPlane, name: str, version: int | None) -> dict[str, Any]:
    """Metadata of model ``name``: ``versions`` lists its calibrator versions (newest first, at most
    :data:`MAX_VERSIONS_LISTED`), or only ``version`` when one is pinned (NotFound if it does not exist)."""
    if version is None:  # in threads: with the S3 store these may ask the bucket
        info = await in_thread(plane.model, name)
        listed = await in_thread(plane.calibrator_versions, name, limit=MAX_VERSIONS_LISTED)
        versions = [str(item) for item in listed]
    else:
        info, _ = await plane.lookup_async(name, version)  # NotFound for a version that does not exist
        versions = [str(version)]
    if info.kind == "upstream":
        return upstream_model_metadata(info, versions, await plane.upstream_metadata(info))
    try:
        _, entry = await plane.lookup_async(name, version)
        with_sets = entry.conformal is not None
    except CalibserveError:  # metadata answers whatever the calibrator's state (a model that fails, ...)
        with_sets = False
    return own_model_metadata(info, versions, with_sets=with_sets)


async def model_not_ready(plane: DataPlane, name: str, version: int | None) -> str | None:
    """Why model ``name`` (calibrator ``version``) cannot answer now (a failing TorchScript model, an
    upstream model that is not ready there), or None; NotFound for an unknown model or version."""
    info, _ = await plane.lookup_async(name, version)
    reason = info.failing
    if reason is None and info.kind == "upstream":
        reason = await plane.upstream_not_ready(info)
    return reason


# ------------------------------------------------------------------------------------ upstream models


def upstream_outputs(
    result: UpstreamPrediction, wanted: Sequence[str] | None
) -> list[tuple[str, tuple[str, np.ndarray] | None]]:
    """The outputs of an upstream model's answer, in order: ``(name, (datatype, array))`` for calibserve's
    own (``probabilities``, ``predicted_class``), ``(name, None)`` for one the upstream wrote (the codec
    copies it as it came). Without ``wanted``, as the upstream does: every output, ``probabilities`` in
    place of the logits. UpstreamFailed for a wanted output the upstream did not answer."""
    answer = result.answer
    if wanted is None:
        sets = [SETS_OUTPUT] if result.prediction_sets is not None else []
        wanted = ["probabilities", *sets, *(name for name in answer.outputs if name != answer.logits_output)]
    float_type = "FP64" if answer.datatype == "FP64" else "FP32"
    outputs: list[tuple[str, tuple[str, np.ndarray] | None]] = []
    for name in wanted:
        if name == "probabilities":
            outputs.append((name, (float_type, result.probabilities)))
        elif name == "predicted_class":
            outputs.append((name, ("INT64", result.predicted_class)))
        elif name == SETS_OUTPUT:
            if result.prediction_sets is None:
                raise InvalidInput(
                    f"output {SETS_OUTPUT!r}: calibrator version {result.calibrator_version} of model "
                    f"{result.model.name!r} has no conformal prediction sets (fit it with conformal)"
                )
            outputs.append((name, ("UINT8", result.prediction_sets)))
        elif name in answer.outputs:
            outputs.append((name, None))
        else:
            spec = result.model.upstream
            model = spec.model if spec is not None else result.model.name
            raise UpstreamFailed(f"upstream model {model!r} answered no output {name!r}")
    return outputs
