"""Request bodies of the v1 API. Array fields are ``Any`` here (see ``bodies``) but documented as arrays."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

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
Labels = Annotated[Any, WithJsonSchema({"type": "array", "items": {"type": "integer", "minimum": 0}})]

METHODS = ("temperature", "vector", "matrix", "platt", "isotonic", "histogram")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    """A logits-only model (the sidecar case): its class count and optional class names."""

    num_classes: int = Field(ge=1, le=100_000)
    class_names: list[str] | None = None
    description: str | None = Field(None, max_length=2000)


class ScoresBody(Strict):
    """Exactly one of logits, probabilities (or, for TorchScript models, inputs)."""

    logits: Matrix | None = None
    probabilities: Matrix | None = None
    inputs: Matrix | None = None


class CalibrateRequest(Strict):
    logits: Matrix | None = None
    probabilities: Matrix | None = None


class PredictRequest(Strict):
    inputs: Matrix
    return_logits: bool = False


class FitRequest(ScoresBody):
    labels: Labels
    method: Literal["temperature", "vector", "matrix", "platt", "isotonic", "histogram"] = "temperature"
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the calibrator")
    activate: bool = True
    sample_weight: Vector | None = None


class EvaluateRequest(ScoresBody):
    labels: Labels
    n_bins: int = Field(15, ge=1, le=1000)
    binning: Literal["width", "mass"] = "width"
    bootstrap: int = Field(0, ge=0, le=10_000)
    seed: int = 0


class MetricsRequest(Strict):
    logits: Matrix | None = None
    probabilities: Matrix | None = None
    labels: Labels
    n_bins: int = Field(15, ge=1, le=1000)
    binning: Literal["width", "mass"] = "width"
    losses: bool = True
    bootstrap: int = Field(0, ge=0, le=10_000)
    seed: int = 0
