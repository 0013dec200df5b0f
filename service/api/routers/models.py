"""v1 codec for models: list, create (logits-only), upload TorchScript, read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.api import tensors
from service.api.auth import AdminAccess, ReadAccess
from service.api.bodies import NumpyJSONResponse, json_body, read_json
from service.api.deps import JSONAnswer, ModelName, Plane
from service.api.schemas import ModelSpec
from service.api.tensors import shape_from_text
from service.serving.concurrency import in_thread

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=JSONAnswer)


@router.get("", summary="List models with their active calibrator", dependencies=ReadAccess)
async def list_models(
    plane: Plane,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> NumpyJSONResponse:
    # a thread: with the S3 store listing is requests to the bucket
    items, next_cursor = await in_thread(plane.list_models, limit=limit, cursor=cursor)
    return NumpyJSONResponse({"items": items, "next_cursor": next_cursor})


@router.put(
    "/{name}",
    summary="Create or update a logits-only model, or one an upstream inference server serves",
    dependencies=AdminAccess,
    responses={
        201: {"description": "the model was created"},
        409: {"description": "a TorchScript model or the active calibrator has another class count"},
    },
    openapi_extra=json_body(ModelSpec, examples={"cifar10": {"num_classes": 10}}),
)
async def put_model(name: ModelName, request: Request, plane: Plane) -> NumpyJSONResponse:
    spec = await read_json(request, ModelSpec)
    info, created = await plane.put_model(
        name,
        num_classes=spec.num_classes,
        class_names=spec.class_names,
        description=spec.description,
        upstream=spec.upstream,
        task=spec.task,
    )
    return NumpyJSONResponse(plane.model_summary(info), status_code=201 if created else 200)


def _upload_metadata(request: Request) -> dict:
    """What the ``X-Model-*`` headers of an upload say of the model."""
    metadata: dict = {}
    for key in ("input_shape", "class_names", "description", "task"):
        header = request.headers.get(f"x-model-{key.replace('_', '-')}")
        if header:
            metadata[key] = header.split(",") if key == "class_names" else header
    if "input_shape" in metadata:
        shape = shape_from_text(metadata["input_shape"], "X-Model-Input-Shape", field="input_shape")
        metadata["input_shape"] = list(shape)
    return metadata


@router.put(
    "/{name}/torchscript",
    summary="Upload a TorchScript model (raw body)",
    dependencies=AdminAccess,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def put_torchscript(name: ModelName, request: Request, plane: Plane) -> NumpyJSONResponse:
    tensors.body_type(request.headers.get("content-type"), (tensors.RAW,))
    info = await plane.put_torchscript(name, await request.body(), _upload_metadata(request))
    return NumpyJSONResponse(plane.model_summary(info))


@router.get("/{name}", summary="Model metadata and active calibrator", dependencies=ReadAccess)
async def get_model(name: ModelName, plane: Plane) -> NumpyJSONResponse:
    info = await in_thread(plane.model, name)  # a thread: with the S3 store this may ask the bucket
    return NumpyJSONResponse(plane.model_summary(info))


@router.delete(
    "/{name}",
    summary="Delete a model with its calibrators",
    dependencies=AdminAccess,
    status_code=204,
    responses={409: {"description": "the model is shipped in the models directory"}},
)
async def delete_model(name: ModelName, plane: Plane) -> Response:
    await plane.delete_model(name)
    return Response(status_code=204)
