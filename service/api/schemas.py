"""Request bodies of the v1 API. Array fields are ``Any`` here (see ``bodies``) but documented as arrays."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.api.bodies import array
from service.core.calibrators import METHODS, MULTILABEL_METHODS
from service.core.metrics import MAX_BOOTSTRAP_RESAMPLES, MAX_N_BINS
from service.core.segments import DEFAULT_MIN_SEGMENT_SIZE
from service.core.validation import MAX_NUM_CLASSES
from service.errors import InvalidInput
from service.inference_protocol import tensor_array
from service.serving.dataplane import EvaluateSpec, Labelled

Matrix = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}},
            "description": "N x K rows",
        }
    ),
]
Vector = Annotated[Any, WithJsonSchema({"type": "array", "items": {"type": "number"}})]
Labels = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {
                "anyOf": [
                    {"type": "integer", "minimum": 0},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}},
                ]
            },
            "description": "one class per row; for a multi-label model, a 0/1 row per sample (N x K) or the "
            "list of its label indices",
        }
    ),
]
Segments = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": ["string", "integer"]},
            "description": "one segment key per row: every figure per segment, and the worst segment",
        }
    ),
]

# the multiclass methods, then those only a multi-label model has (shared_temperature)
Method = Literal[tuple(dict.fromkeys((*METHODS, *MULTILABEL_METHODS)))]  # type: ignore[valid-type]


MAX_CLASS_NAME_LENGTH = 256
EceConvention = Literal["calibserve", "torchmetrics", "sklearn", "netcal", "guo2017", "kumar2019"]
ECE_CONVENTION = (
    "add ece_<convention>: the top-label ECE as that library computes it on the same data "
    "(docs/ece-conventions.md); the report's own ece is unchanged"
)
NLL_CLIP = (
    "report the NLL with p_y clipped to [nll_clip, 1 - nll_clip] (as sklearn's log_loss); null (default): "
    "the exact NLL, null when infinite (a true class of probability 0), its rows in nll_infinite_rows"
)
"""Longest class name accepted (characters): names are labels, echoed in every answer's ``predicted_label``."""


class Strict(BaseModel):
    """Unknown fields refused, and no coercion: ``true`` is not 1, ``"3"`` is not 3, ``"yes"`` is not true.

    Query-string values of ``.npz`` bodies are converted to their field's type first (``service.api.labelled``).
    """

    model_config = ConfigDict(extra="forbid", strict=True)


ClassName = Annotated[str, Field(min_length=1, max_length=MAX_CLASS_NAME_LENGTH)]


UpstreamSpec = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "object",
            "properties": {
                "url": {
                    "type": "string",
                    "description": "http://host:port (default: the server's --upstream)",
                },
                "model": {"type": "string", "description": "the model's name upstream (default: this name)"},
                "version": {
                    "type": "string",
                    "description": "the model's version upstream (default: its own)",
                },
                "output": {
                    "type": "string",
                    "description": "the logits output (default: the only one, or logits)",
                },
            },
            "additionalProperties": False,
        }
    ),
]
UpstreamTensors = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "array"},
                },
                "required": ["name", "datatype", "shape", "data"],
            },
            "description": "Open Inference Protocol input tensors (JSON data) of a multi-input upstream model",
        }
    ),
]


class ModelSpec(Strict):
    """A logits-only model (the sidecar case), or one an upstream inference server serves (``upstream``): its
    class count and optional class names.

    ``num_classes`` is at most ``MAX_NUM_CLASSES`` (:mod:`service.core.validation`); ``class_names`` holds one
    name per class, each 1 to ``MAX_CLASS_NAME_LENGTH`` characters (so a model's names are at most
    ``MAX_NUM_CLASSES * MAX_CLASS_NAME_LENGTH`` characters, about 25 MB at the largest).
    """

    num_classes: int = Field(ge=1, le=MAX_NUM_CLASSES)
    class_names: list[ClassName] | None = Field(None, max_length=MAX_NUM_CLASSES)
    description: str | None = Field(None, max_length=2000)
    upstream: UpstreamSpec | None = None
    task: Literal["multiclass", "multilabel"] | None = Field(
        None,
        description="multilabel: num_classes independent sigmoid outputs (labels a 0/1 matrix or index lists; "
        "answers K probabilities per row that need not sum to 1); default multiclass",
    )


class ScoresBody(Strict):
    """Exactly one of logits, probabilities (or, for TorchScript and upstream models, inputs; for upstream
    models with several inputs, upstream_inputs)."""

    logits: Matrix | None = None
    probabilities: Matrix | None = None
    inputs: Matrix | None = None
    upstream_inputs: UpstreamTensors | None = None


RowSegments = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": ["string", "integer", "null"]},
            "description": "one segment key per row, for a segment_temperature calibrator: a row of a segment "
            "the fit did not see (or null) gets the global temperature, and segment_fallback says so",
        }
    ),
]


SetsSeed = Annotated[
    int | None,
    Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="seed of randomised conformal prediction sets (a version fitted with conformal.randomized): "
        "the same seed gives the same sets; without one each request draws fresh randomness",
    ),
]


class CalibrateRequest(Strict):
    logits: Matrix | None = None
    probabilities: Matrix | None = None
    segments: RowSegments | None = None
    seed: SetsSeed = None
    intervals: bool = Field(
        False,
        description="answer probability_intervals too: [p0, p1] per row and class (venn_abers calibrators)",
    )


class PredictRequest(Strict):
    inputs: Matrix
    return_logits: bool = False
    segments: RowSegments | None = None
    seed: SetsSeed = None


class FitRequest(ScoresBody):
    labels: Labels
    method: Method = "temperature"
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the calibrator")
    activate: bool = True
    sample_weight: Vector | None = None
    segments: Segments | None = Field(
        None, description="one segment key per row: method segment_temperature fits a temperature per segment"
    )
    conformal: dict[str, Any] | None = Field(
        None,
        description='split-conformal prediction sets stored in this version: {"score": "lac" | "aps" | "raps", '
        '"alpha": 0.1, "mondrian": false, "randomized": false, "k_reg": 1, "lambda": 0.01, "seed": 0} '
        "(k_reg and lambda for raps only); the threshold is the ceil((n+1)(1-alpha))-th smallest conformity "
        "score of the held-out rows' calibrated probabilities",
    )
    conformal_fraction: float | None = Field(
        None,
        description="with conformal: the share of rows held out (stratified by label) for the conformal "
        "threshold, the calibrator being fitted on the rest; default 0.5; 0 fits both on every row",
    )


class FigureOptions(Strict):
    """How an evaluation or ``/v1/metrics`` computes its figures (:class:`EvaluateSpec`)."""

    n_bins: int = Field(15, ge=1, le=MAX_N_BINS)
    binning: Literal["width", "mass"] = "width"
    bootstrap: int = Field(0, ge=0, le=MAX_BOOTSTRAP_RESAMPLES)
    seed: int = 0
    nll_clip: float | None = Field(None, gt=0.0, lt=0.5, description=NLL_CLIP)
    ece_convention: EceConvention | None = Field(None, description=ECE_CONVENTION)
    per_class_tests: bool = Field(
        False, description="also the calibration tests of each class (per_class_tests)"
    )
    segments: Segments | None = None
    min_segment_size: int = Field(DEFAULT_MIN_SEGMENT_SIZE, ge=1, le=2**31 - 1)

    def spec(self) -> EvaluateSpec:
        return EvaluateSpec(**{name: getattr(self, name) for name in FigureOptions.model_fields})


class EvaluateRequest(ScoresBody, FigureOptions):
    labels: Labels
    conformal: dict[str, Any] | None = Field(
        None,
        description="prediction sets fitted on part of these rows (the fit's conformal options), their "
        "coverage reported on the rest; without it, a version fitted with conformal sets reports its own",
    )
    conformal_fraction: float | None = Field(
        None, description="with conformal: the share of rows that give the threshold (default 0.5)"
    )


class OutcomesRequest(Strict):
    """Labels of logged predictions (``prediction_ids``), or labelled ``logits`` / ``probabilities`` a batch
    job joined itself (scored with ``calibrator_version``, the active one by default)."""

    labels: Labels
    prediction_ids: list[Any] | None = None
    logits: Matrix | None = None
    probabilities: Matrix | None = None
    calibrator_version: int | None = Field(None, ge=1, le=2**31 - 1)


class RefitRequest(Strict):
    """A refit from the logged outcomes of ``window``: ``holdout`` of them held out to compare the new version
    with the active one; ``activate``: true, false or ``"if_better"`` (the held-out NLL improves)."""

    window: str = "24h"
    method: Method = "temperature"
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the calibrator")
    holdout: float = Field(0.3, gt=0.0, lt=1.0)
    activate: bool | Literal["if_better"] = False
    seed: int = 0


class MetricsRequest(FigureOptions):
    logits: Matrix | None = None
    probabilities: Matrix | None = None
    labels: Labels
    losses: bool = True
    task: Literal["multiclass", "multilabel"] | None = Field(
        None, description="multilabel: per-label sigmoid scores and a 0/1 label matrix (or index lists)"
    )


def one_of(body: BaseModel, names: tuple[str, ...]) -> tuple[str, Any]:
    """Exactly one of the named array fields of a request body, as (name, array); ``upstream_inputs`` as
    ``[(name, array), ...]``."""
    given = [name for name in names if getattr(body, name, None) is not None]
    if len(given) != 1:
        raise InvalidInput(
            f"send exactly one of {', '.join(names)}; got {len(given) or 'none'}", field="body"
        )
    if given[0] == "upstream_inputs":
        return given[0], named_tensors(body.upstream_inputs)
    return given[0], array(getattr(body, given[0]), given[0])


def named_tensors(value: Any) -> list[tuple[str, np.ndarray]]:
    """Open Inference Protocol input tensors with JSON data, as ``[(name, array)]``."""
    if not isinstance(value, list) or not value:
        raise InvalidInput("upstream_inputs must be a non-empty list of tensors", field="upstream_inputs")
    tensors = []
    for index, entry in enumerate(value):
        what = f"upstream_inputs[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"{what} must be a tensor object with a name", field="upstream_inputs")
        if "data" not in entry:
            raise InvalidInput(f"{what}: data is required (JSON data only here)", field="upstream_inputs")
        tensors.append((entry["name"], tensor_array(entry, None, what)))
    return tensors


def labelled(body: BaseModel, kinds: tuple[str, ...]) -> Labelled:
    """The labelled set of a fit, evaluate or figures body."""
    kind, values = one_of(body, kinds)
    return Labelled(
        kind, values, body.labels, getattr(body, "sample_weight", None), getattr(body, "segments", None)
    )
