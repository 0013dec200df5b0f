"""Serving: calibrate logits, predict through a TorchScript model, evaluate on labelled data."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service import workflows
from service.api.bodies import NumpyJSONResponse, json_body, read_json
from service.api.deps import ModelName, ReadAccess, State
from service.api.routers.common import compute, model_logits, one_of
from service.api.schemas import CalibrateRequest, EvaluateRequest, PredictRequest
from service.api.state import AppState
from service.errors import InvalidInput

router = APIRouter(prefix="/v1/models/{name}", tags=["inference"], dependencies=ReadAccess)

PinnedVersion = Annotated[
    int | None, Query(ge=1, le=2**31 - 1, description="serve this version, not the active")
]


def check_columns(info: dict, scores: np.ndarray, field: str) -> None:
    expected = info.get("num_classes")
    if expected is not None and scores.ndim == 2 and scores.shape[1] != expected:
        raise InvalidInput(
            f"model {info['name']!r} has {expected} classes; {field} has {scores.shape[1]} columns",
            field=field,
        )


def answer(
    probabilities: np.ndarray, version: int | None, info: dict, extra: dict | None = None
) -> dict[str, Any]:
    predicted = probabilities.argmax(axis=1)
    body: dict[str, Any] = {
        "probabilities": probabilities,
        "predicted_class": predicted,
        "calibrator_version": version,
    }
    names = info.get("class_names")
    if names:
        body["predicted_label"] = [names[k] for k in predicted.tolist()]
    if extra:
        body.update(extra)
    return body


async def calibrated(state: AppState, name: str, version: int | None, scores: np.ndarray, from_logits: bool):
    entry = state.calibrator_for(name, version)
    probabilities = await compute(
        workflows.calibrate, entry.calibrator, scores, from_logits=from_logits, size=scores.size
    )
    return probabilities, entry.version


@router.post(
    "/calibrate",
    summary="Calibrated probabilities for logits (or probabilities)",
    openapi_extra=json_body(CalibrateRequest, examples={"one row": {"logits": [[2.0, 0.5, -1.0]]}}),
)
async def calibrate(name: ModelName, request: Request, state: State, version: PinnedVersion = None):
    body = await read_json(request, CalibrateRequest)
    kind, scores = one_of(body, ("logits", "probabilities"))
    info = state.model_info(name)
    check_columns(info, scores, kind)
    probabilities, used = await calibrated(state, name, version, scores, kind == "logits")
    return NumpyJSONResponse(answer(probabilities, used, info))


@router.post(
    "/predict",
    summary="Run the TorchScript model on inputs and calibrate its logits",
    openapi_extra=json_body(PredictRequest),
    responses={502: {"description": "the model raised or returned NaN / the wrong shape"}},
)
async def predict(name: ModelName, request: Request, state: State, version: PinnedVersion = None):
    body = await read_json(request, PredictRequest)
    info = state.model_info(name)
    if info.get("kind") != "torchscript":
        raise InvalidInput(f"model {name!r} is logits-only; POST its logits to /calibrate", field="inputs")
    logits, _ = await model_logits(
        state, name, "inputs", np.asarray(body.inputs) if body.inputs is not None else None
    )
    probabilities, used = await calibrated(state, name, version, logits, True)
    return NumpyJSONResponse(
        answer(probabilities, used, info, {"logits": logits} if body.return_logits else None)
    )


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
    check_columns(info, scores, kind)
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
    if entry.document is not None:
        report["drift"] = workflows.drift_against_fit(report, entry.document)
    return NumpyJSONResponse(report)
