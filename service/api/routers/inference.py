"""Serving: calibrate logits, predict through a TorchScript model, evaluate on labelled data.

``POST /calibrate`` and ``/predict`` are the sidecar's hot path. They are answered by lean Starlette-level
routes (:func:`install_lean_routes`, see :mod:`service.api.bodies`) placed in front of the documented
FastAPI routes of the same paths; both call the same functions here, so they answer alike. Bodies may be
JSON, ``.npy`` or raw little-endian tensors (:mod:`service.api.tensors`), chosen by Content-Type and
Accept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import workflows
from service.api import tensors
from service.api.bodies import (
    LeanRequest,
    LeanRoute,
    NumpyJSONResponse,
    array,
    authorize,
    json_body,
    parse_object,
    read_json,
    validate_object,
)
from service.api.deps import ModelName, ReadAccess, State
from service.api.routers.common import compute, model_logits, one_of
from service.api.schemas import CalibrateRequest, EvaluateRequest, PredictRequest
from service.api.state import ActiveCalibrator, AppState, ModelView
from service.core.probability import softmax
from service.core.validation import n_label_classes, same_class_count
from service.errors import InvalidInput
from service.store import validate_model_name

router = APIRouter(prefix="/v1/models/{name}", tags=["inference"], dependencies=ReadAccess)

MAX_VERSION = 2**31 - 1
PinnedVersion = Annotated[
    int | None, Query(ge=1, le=MAX_VERSION, description="serve this version, not the active")
]
HeaderGetter = Callable[[str], "str | bytes | None"]


# ----------------------------------------------------------------------------------------- model views


# ------------------------------------------------------------------------------------------ the work


def check_columns(name: str, expected: int | None, scores: np.ndarray, field: str) -> None:
    """400 when ``scores`` has a column count that does not fit the model's ``expected`` classes."""
    if expected is not None and scores.ndim == 2 and not same_class_count(scores.shape[1], expected):
        raise InvalidInput(
            f"model {name!r} has {expected} classes; {field} has {scores.shape[1]} columns",
            field=field,
        )


def calibrate_array(calibrator: Any | None, scores: Any, *, from_logits: bool) -> np.ndarray:
    """``workflows.calibrate`` validating the scores once (the calibrator's own check is skipped)."""
    logits = workflows.scores_to_logits(scores, from_logits=from_logits)
    if calibrator is None:
        return softmax(logits)
    if n_label_classes(logits.shape[1]) != calibrator.num_classes_:
        return calibrator.transform(logits)  # raises the calibrator's own message
    return calibrator.transform(logits, validate=False)


async def calibrated(entry: ActiveCalibrator, scores: np.ndarray, from_logits: bool):
    probabilities = await compute(
        calibrate_array, entry.calibrator, scores, from_logits=from_logits, size=scores.size
    )
    return probabilities, entry.version


async def run_model(
    state: AppState, name: str, entry: ActiveCalibrator, inputs: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(logits, probabilities)`` of TorchScript model ``name``; probabilities None: calibrate on the CPU.

    On a GPU the calibrator runs there, after the forward pass, as one vectorised operation (the exported
    module of :func:`service.registry.calibrator_module`); on the CPU numpy's exact float64 calibration
    follows instead. With dynamic batching on, concurrent requests share the forward pass.
    """
    state.sync_uploaded_model(name)
    registry = state.registry
    model, batch = await compute(registry.prepare, name, inputs, size=inputs.size)
    calibrator = entry.calibrator
    # A calibrator fitted for another class count is left to the CPU path, which names the mismatch.
    fits = calibrator is None or calibrator.num_classes_ == model.num_classes
    on_device = model.device.type != "cpu" and fits

    def run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        module = registry.calibrator_on_device(model, calibrator) if on_device else None
        return registry.run(model, rows, module)

    if state.batcher is not None:
        key = (id(model), id(calibrator), on_device)  # both held by `run` while queued: ids stay unique
        logits, probabilities = await state.batcher.submit(key, batch, run)
    else:
        logits, probabilities = await run_in_threadpool(run, batch)
    return logits, probabilities


async def predicted(
    state: AppState, name: str, entry: ActiveCalibrator, inputs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(logits, calibrated probabilities, calibrator version)`` of TorchScript model ``name``."""
    logits, probabilities = await run_model(state, name, entry, inputs)
    if probabilities is None:
        return logits, *await calibrated(entry, logits, True)
    return logits, probabilities, entry.version


def answer(
    probabilities: np.ndarray, version: int | None, view: ModelView | dict, extra: dict | None = None
) -> dict[str, Any]:
    predicted = probabilities.argmax(axis=1)
    body: dict[str, Any] = {
        "probabilities": probabilities,
        "predicted_class": predicted,
        "calibrator_version": version,
    }
    names = view.get("class_names") if isinstance(view, dict) else view.class_names
    if names:
        body["predicted_label"] = [names[k] for k in predicted.tolist()]
    if extra:
        body.update(extra)
    return body


@dataclass
class Scores:
    """A decoded request: which array it is, the array, and the element type it came in."""

    kind: str
    values: np.ndarray
    dtype: np.dtype | None
    return_logits: bool = False


def read_scores(
    content_type: str, header: HeaderGetter, body: bytes, *, names: tuple[str, ...], predict: bool
) -> Scores:
    """Decode a calibrate (``names`` = logits, probabilities) or predict (``inputs``) body of any type."""
    if content_type == tensors.JSON:
        data = parse_object(body)
        if predict:
            request = validate_object(data, PredictRequest)
            return Scores("inputs", array(request.inputs, "inputs"), None, request.return_logits)
        kind, values = one_of(validate_object(data, CalibrateRequest), names)
        return Scores(kind, values, None)  # JSON numbers carry no width: binary answers are float32
    named = header(tensors.NAME_HEADER)
    kind = (named.decode("latin-1") if isinstance(named, bytes) else named or names[0]).strip()
    if kind not in names:
        raise InvalidInput(
            f"{tensors.NAME_HEADER} {kind!r} is not one of {', '.join(names)}", field=tensors.NAME_HEADER
        )
    if content_type == tensors.NPY:
        values = tensors.decode_npy(body)
    else:
        values = tensors.decode_raw(
            body,
            tensors.parse_shape(header(tensors.SHAPE_HEADER)),
            tensors.raw_dtype(header(tensors.DTYPE_HEADER)),
        )
    return Scores(kind, values, values.dtype if values.dtype.kind == "f" else None)


def tensor_response(
    kind: str,
    probabilities: np.ndarray,
    version: int | None,
    view: ModelView,
    source_dtype: np.dtype | None,
    extra: dict | None = None,
) -> Response:
    """The answer in media type ``kind``: the JSON document, or the probabilities as a tensor."""
    if kind == tensors.JSON:
        return NumpyJSONResponse(answer(probabilities, version, view, extra))
    dtype = tensors.wire_dtype(source_dtype)
    if kind == tensors.NPY:
        content = tensors.encode_npy(probabilities, dtype)
    else:
        content = tensors.encode_raw(probabilities, dtype)
    headers = {
        tensors.NAME_HEADER: "probabilities",
        tensors.SHAPE_HEADER: tensors.shape_text(probabilities.shape),
        tensors.DTYPE_HEADER: dtype.name,
        tensors.VERSION_HEADER: "none" if version is None else str(version),
    }
    if probabilities.shape[0] <= tensors.MAX_PREDICTED_CLASS_ROWS:
        headers[tensors.PREDICTED_HEADER] = ",".join(map(str, probabilities.argmax(axis=1).tolist()))
    return Response(content, media_type=kind, headers=headers)


def read_request(
    state: AppState, name: str, version: int | None, header: HeaderGetter, body: bytes, *, predict: bool
) -> tuple[str, Scores, ModelView, ActiveCalibrator]:
    """What calibrate and predict both start with: ``(answer type, decoded body, model view, calibrator)``."""
    state.require_ready()
    content_type = tensors.request_type(header("content-type"))
    accept = tensors.response_type(header("accept"), content_type)
    names = ("inputs",) if predict else ("logits", "probabilities")
    scores = read_scores(content_type, header, body, names=names, predict=predict)
    return accept, scores, *state.views.lookup(name, version)


async def serve_calibrate(
    state: AppState, name: str, version: int | None, header: HeaderGetter, body: bytes
) -> Response:
    accept, scores, view, entry = read_request(state, name, version, header, body, predict=False)
    check_columns(name, view.num_classes, scores.values, scores.kind)
    probabilities, used = await calibrated(entry, scores.values, scores.kind == "logits")
    return tensor_response(accept, probabilities, used, view, scores.dtype)


async def serve_predict(
    state: AppState, name: str, version: int | None, header: HeaderGetter, body: bytes
) -> Response:
    accept, scores, view, entry = read_request(state, name, version, header, body, predict=True)
    if view.kind != "torchscript":
        raise InvalidInput(f"model {name!r} is logits-only; POST its logits to /calibrate", field="inputs")
    logits, probabilities, used = await predicted(state, name, entry, scores.values)
    extra = {"logits": logits} if scores.return_logits else None
    return tensor_response(accept, probabilities, used, view, scores.dtype, extra)


# ---------------------------------------------------------------------------------- documented routes

_TENSOR_SCHEMA = {"type": "string", "format": "binary"}
_TENSOR_HEADERS = [
    {
        "name": tensors.NAME_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "binary bodies: which array the body is (logits by default; inputs for /predict)",
    },
    {
        "name": tensors.SHAPE_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"},
        "description": "application/octet-stream bodies: the shape, e.g. 64,1000",
    },
    {
        "name": tensors.DTYPE_HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "enum": list(tensors.RAW_DTYPES)},
        "description": "application/octet-stream bodies: the element type (float32 by default)",
    },
]
_BINARY_BODIES = {
    tensors.NPY: {"schema": _TENSOR_SCHEMA},
    tensors.RAW: {"schema": _TENSOR_SCHEMA},
}
_ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "predicted_class": {"type": "array", "items": {"type": "integer"}},
        "predicted_label": {"type": "array", "items": {"type": "string"}},
        "calibrator_version": {"type": ["integer", "null"]},
        "logits": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    },
    "required": ["probabilities", "predicted_class", "calibrator_version"],
}
_ANSWERS = {
    200: {
        "description": "calibrated probabilities (JSON document, or a tensor with X-Tensor-* headers)",
        "content": {
            tensors.JSON: {"schema": _ANSWER_SCHEMA},
            tensors.NPY: {"schema": _TENSOR_SCHEMA},
            tensors.RAW: {"schema": _TENSOR_SCHEMA},
        },
    },
    406: {"description": "Accept names no type this route answers"},
    415: {"description": "unsupported Content-Type"},
}


def _openapi(model, examples=None) -> dict[str, Any]:
    extra = json_body(model, examples=examples, other_content=_BINARY_BODIES)
    extra["parameters"] = _TENSOR_HEADERS
    return extra


def _request_header(request: Request) -> HeaderGetter:
    return request.headers.get


@router.post(
    "/calibrate",
    summary="Calibrated probabilities for logits (or probabilities)",
    openapi_extra=_openapi(CalibrateRequest, examples={"one row": {"logits": [[2.0, 0.5, -1.0]]}}),
    response_class=Response,
    responses=_ANSWERS,
)
async def calibrate(name: ModelName, request: Request, state: State, version: PinnedVersion = None):
    return await serve_calibrate(state, name, version, _request_header(request), await request.body())


@router.post(
    "/predict",
    summary="Run the TorchScript model on inputs and calibrate its logits",
    openapi_extra=_openapi(PredictRequest),
    response_class=Response,
    responses={**_ANSWERS, 502: {"description": "the model raised or returned NaN / the wrong shape"}},
)
async def predict(name: ModelName, request: Request, state: State, version: PinnedVersion = None):
    return await serve_predict(state, name, version, _request_header(request), await request.body())


@router.post(
    "/evaluate",
    summary="Figures before and after calibration, and drift against fit time",
    openapi_extra=json_body(EvaluateRequest),
)
async def evaluate(name: ModelName, request: Request, state: State, version: PinnedVersion = None):
    body = await read_json(request, EvaluateRequest)
    info = state.model_info(name)
    kind, values = one_of(body, ("logits", "probabilities", "inputs"))
    scores, from_logits = await model_logits(state, name, kind, values)
    check_columns(name, info.get("num_classes"), scores, kind)
    entry = state.calibrator_for(name, version)
    report = await run_in_threadpool(
        workflows.evaluate,
        scores,
        body.labels,
        from_logits=from_logits,
        calibrator=entry.calibrator,
        calibrator_document=entry.document,
        n_bins=body.n_bins,
        binning=body.binning,
        bootstrap=body.bootstrap,
        seed=body.seed,
    )
    report["model"] = name
    return NumpyJSONResponse(report)


# --------------------------------------------------------------------------------------- lean routes


def pinned_version(text: str | None) -> int | None:
    """The ``?version=`` query of a lean route, checked as the documented route's ``PinnedVersion``."""
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        raise RequestValidationError(
            [{"loc": ("query", "version"), "msg": "Input should be a valid integer", "type": "int_parsing"}]
        ) from None
    if not 1 <= number <= MAX_VERSION:
        bound = "greater than or equal to 1" if number < 1 else f"less than or equal to {MAX_VERSION}"
        raise RequestValidationError(
            [{"loc": ("query", "version"), "msg": f"Input should be {bound}", "type": "range"}]
        )
    return number


def _lean_header(request: LeanRequest) -> HeaderGetter:
    def header(name: str) -> bytes | None:
        return request.header(name.lower().encode("latin-1"))

    return header


def _lean(serve) -> Callable[[LeanRequest], Any]:
    async def handle(request: LeanRequest) -> Response:
        authorize(request, "read")
        state: AppState = request.scope["app"].state.calibserve
        name = validate_model_name(request.path_params["name"])
        version = pinned_version(request.query("version"))
        return await serve(state, name, version, _lean_header(request), await request.body())

    return handle


def install_lean_routes(app: FastAPI) -> None:
    """Put the lean calibrate and predict routes in front of the documented ones."""
    lean = [
        LeanRoute("/v1/models/{name}/calibrate", _lean(serve_calibrate), methods=["POST"], name="calibrate"),
        LeanRoute("/v1/models/{name}/predict", _lean(serve_predict), methods=["POST"], name="predict"),
    ]
    app.router.routes[0:0] = lean
