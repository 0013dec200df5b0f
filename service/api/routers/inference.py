"""v1 inference codec: calibrate logits, predict through a TorchScript model, evaluate on labelled data.

``POST /calibrate`` and ``/predict`` are the sidecar's hot path: each is one :class:`LeanRoute` (a plain
ASGI handler; its OpenAPI operation is in :mod:`service.api.openapi`). Bodies may be JSON, ``.npy`` or raw
little-endian tensors (:mod:`service.api.tensors`), chosen by Content-Type and Accept. The work is the
data plane's; this module only decodes and encodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api import tensors
from service.api.auth import ReadAccess
from service.api.bodies import (
    LeanRequest,
    LeanRoute,
    NumpyJSONResponse,
    array,
    authorize,
    cancelled_on_disconnect,
    json_body,
    parse_object,
    validate_object,
)
from service.api.deps import JSONAnswer, ModelName, PinnedVersion, Plane
from service.api.labelled import labelled_bodies, read_labelled
from service.api.schemas import CalibrateRequest, EvaluateRequest, PredictRequest, labelled, one_of
from service.errors import InvalidInput
from service.names import parse_version, validate_model_name
from service.serving.dataplane import LABELLED_KINDS, DataPlane, Prediction

router = APIRouter(prefix="/v1/models/{name}", tags=["inference"], dependencies=[*ReadAccess, *JSONAnswer])

HeaderGetter = Callable[[str], "str | bytes | None"]


def answer(prediction: Prediction, extra: dict | None = None) -> dict[str, Any]:
    if prediction.multilabel:
        return multilabel_answer(prediction, extra)
    predicted = prediction.predicted_class
    body: dict[str, Any] = {
        "probabilities": prediction.probabilities,
        "predicted_class": predicted,
        "calibrator_version": prediction.calibrator_version,
    }
    labels = prediction.predicted_labels(predicted)
    if labels is not None:
        body["predicted_label"] = labels
    if prediction.ids is not None:
        body["prediction_ids"] = prediction.ids.as_list()
    if prediction.segment_fallback is not None:
        body["segment_fallback"] = prediction.segment_fallback
    if prediction.intervals is not None:
        body["probability_intervals"] = prediction.intervals
    if prediction.prediction_sets is not None:  # lists of class indices, at the version's alpha
        body["prediction_sets"] = [row.nonzero()[0].tolist() for row in prediction.prediction_sets]
        body["alpha"] = prediction.alpha
    if extra:
        body.update(extra)
    return body


def multilabel_answer(prediction: Prediction, extra: dict | None = None) -> dict[str, Any]:
    """A multi-label model's answer: K probabilities per row (they need not sum to 1) and, per row, the
    labels whose calibrated probability is at least 1/2 (``predicted_labels``, indices; ``predicted_label``,
    names, where the model has them)."""
    chosen = [np.flatnonzero(row).tolist() for row in prediction.predicted_class]
    body: dict[str, Any] = {
        "task": "multilabel",
        "probabilities": prediction.probabilities,
        "predicted_labels": chosen,
        "calibrator_version": prediction.calibrator_version,
    }
    names = prediction.model.class_names
    if names:
        body["predicted_label"] = [[names[k] for k in row] for row in chosen]
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
    segments: list | None = None  # JSON bodies only: one key per row, for a segment_temperature calibrator
    seed: int | None = None  # JSON bodies only: of randomised prediction sets
    intervals: bool = False  # JSON bodies only: answer probability_intervals (venn_abers)


def read_scores(
    content_type: str, header: HeaderGetter, body: bytes, *, names: tuple[str, ...], predict: bool
) -> Scores:
    """Decode a calibrate (``names`` = logits, probabilities) or predict (``inputs``) body of any type."""
    if content_type == tensors.JSON:
        data = parse_object(body)
        if predict:
            request = validate_object(data, PredictRequest)
            segments = _row_segments(request.segments)
            return Scores(
                "inputs", array(request.inputs, "inputs"), None, request.return_logits, segments, request.seed
            )
        request = validate_object(data, CalibrateRequest)
        kind, values = one_of(request, names)
        # JSON numbers carry no width: binary answers are float32
        return Scores(
            kind,
            values,
            None,
            segments=_row_segments(request.segments),
            seed=request.seed,
            intervals=request.intervals,
        )
    named = header(tensors.NAME_HEADER.lower())
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
            tensors.parse_shape(header(tensors.SHAPE_HEADER.lower())),
            tensors.raw_dtype(header(tensors.DTYPE_HEADER.lower())),
        )
    return Scores(kind, values, values.dtype if values.dtype.kind == "f" else None)


def _row_segments(segments: Any) -> list | None:
    if segments is None:
        return None
    if not isinstance(segments, list):
        raise InvalidInput(
            "segments must be a list with one key (string, integer or null) per row", field="segments"
        )
    return segments


def tensor_response(
    kind: str, prediction: Prediction, source_dtype: np.dtype | None, extra: dict | None = None
) -> Response:
    """The answer in media type ``kind``: the JSON document, or the probabilities as a tensor."""
    if kind == tensors.JSON:
        return NumpyJSONResponse(answer(prediction, extra))
    probabilities, version = prediction.probabilities, prediction.calibrator_version
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
    if probabilities.shape[0] <= tensors.MAX_PREDICTED_CLASS_ROWS and not prediction.multilabel:
        headers[tensors.PREDICTED_HEADER] = ",".join(map(str, prediction.predicted_class.tolist()))
    if prediction.ids is not None:  # row i's id is "<prefix>.<i>"
        headers[tensors.PREDICTION_ID_HEADER] = prediction.ids.prefix
    return Response(content, media_type=kind, headers=headers)


async def serve_calibrate(plane: DataPlane, request: LeanRequest) -> Response:
    name, version, accept, scores = await _decode(plane, request, predict=False)
    intervals = scores.intervals or _intervals_query(request.query("intervals"))
    if intervals and accept != tensors.JSON:
        raise InvalidInput(
            "probability intervals are answered in JSON only (Accept: application/json)", field="intervals"
        )
    prediction = await plane.calibrate(
        name, version, scores.kind, scores.values, scores.segments, scores.seed, intervals=intervals
    )
    return _with_store_age(plane, tensor_response(accept, prediction, scores.dtype))


async def serve_predict(plane: DataPlane, request: LeanRequest) -> Response:
    name, version, accept, scores = await _decode(plane, request, predict=True)
    prediction = await plane.predict(name, version, scores.values, scores.segments, scores.seed)
    extra = {"logits": prediction.logits} if scores.return_logits else None
    return _with_store_age(plane, tensor_response(accept, prediction, scores.dtype, extra))


def _intervals_query(text: str | None) -> bool:
    """``?intervals=true|false`` (absent: false)."""
    if text is None or text == "false":
        return False
    if text != "true":
        raise InvalidInput(f"intervals must be true or false, got {text[:40]!r}", field="intervals")
    return True


def _with_store_age(plane: DataPlane, response: Response) -> Response:
    """Say how old the view is when the answer came from a cached view of a store that cannot be read."""
    age = plane.store_view_age()
    if age > 0:
        response.headers[tensors.STORE_AGE_HEADER] = f"{age:.1f}"
    return response


async def _decode(
    plane: DataPlane, request: LeanRequest, *, predict: bool
) -> tuple[str, int | None, str, Scores]:
    """What calibrate and predict both start with: the name, version, answer type and decoded body."""
    authorize(request, "read")
    name = validate_model_name(request.path_params["name"])
    version = parse_version(request.query("version"))
    plane.require_ready()
    content_type = tensors.request_type(request.header("content-type"))
    accept = tensors.response_type(request.header("accept"), content_type)
    names = ("inputs",) if predict else ("logits", "probabilities")
    scores = read_scores(content_type, request.header, await request.body(), names=names, predict=predict)
    return name, version, accept, scores


def _lean(serve) -> Callable[[LeanRequest], Any]:
    async def handle(request: LeanRequest) -> Response:
        return await serve(request.scope["app"].state.dataplane, request)

    return handle


ROUTES = [
    LeanRoute("/v1/models/{name}/calibrate", _lean(serve_calibrate), methods=["POST"], name="calibrate"),
    LeanRoute("/v1/models/{name}/predict", _lean(serve_predict), methods=["POST"], name="predict"),
]


@router.post(
    "/evaluate",
    summary="Figures before and after calibration, and drift against fit time",
    openapi_extra=json_body(EvaluateRequest, other_content=labelled_bodies(EvaluateRequest)),
)
async def evaluate(name: ModelName, request: Request, plane: Plane, version: PinnedVersion = None):
    body = await read_labelled(request, EvaluateRequest, route_parameters=("version",))
    spec = replace(body.spec(), conformal=body.conformal, conformal_fraction=body.conformal_fraction)
    data = labelled(body, LABELLED_KINDS)
    async with cancelled_on_disconnect(request, plane.budget()) as budget:
        report = await plane.evaluate(name, version, data, spec, budget)
    return NumpyJSONResponse(report)
