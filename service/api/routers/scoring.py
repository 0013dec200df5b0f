"""Stateless figures: POST labelled logits or probabilities, get every calibration figure and loss back."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service import workflows
from service.api.bodies import NumpyJSONResponse, json_body, read_json
from service.api.deps import ReadAccess
from service.api.routers.common import one_of
from service.api.schemas import MetricsRequest
from service.core import losses

router = APIRouter(prefix="/v1", tags=["metrics"], dependencies=ReadAccess)


def _figures(body: MetricsRequest, kind, scores) -> dict:
    report = workflows.evaluate(
        scores,
        body.labels,
        from_logits=kind == "logits",
        n_bins=body.n_bins,
        binning=body.binning,
        bootstrap=body.bootstrap,
        seed=body.seed,
    )
    answer = {
        **report["uncalibrated"],
        "conventions": report["conventions"],
        "reliability": report["reliability"]["uncalibrated"],
    }
    if "intervals" in report:
        answer["intervals"] = report["intervals"]["uncalibrated"]
    if body.losses:
        logits = workflows.scores_to_logits(scores, from_logits=kind == "logits")
        answer["losses"] = losses.evaluation_losses(logits, body.labels)
    return answer


@router.post(
    "/metrics",
    summary="ECE (and variants), MCE, Brier, NLL, accuracy, reliability bins and evaluation losses",
    openapi_extra=json_body(
        MetricsRequest,
        examples={"three rows": {"probabilities": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], "labels": [0, 1, 1]}},
    ),
)
async def figures(request: Request) -> NumpyJSONResponse:
    body = await read_json(request, MetricsRequest)
    kind, scores = one_of(body, ("logits", "probabilities"))
    return NumpyJSONResponse(await run_in_threadpool(_figures, body, kind, scores))
