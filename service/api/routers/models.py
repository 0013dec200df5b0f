"""Models: list, create (logits-only), upload TorchScript, read, delete."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.bodies import NumpyJSONResponse, json_body, read_json
from service.api.deps import AdminAccess, ModelName, ReadAccess, State
from service.api.schemas import ModelSpec
from service.errors import Conflict, InvalidInput, NotFound

router = APIRouter(prefix="/v1/models", tags=["models"])


def _with_active(state, info: dict) -> dict:
    active = state.active(info["name"])
    info["active_calibrator"] = (
        None
        if active.document is None
        else {
            key: active.document.get(key)
            for key in ("version", "method", "temperature", "fitted_at")
            if key in active.document
        }
    )
    return info


@router.get("", summary="List models with their active calibrator", dependencies=ReadAccess)
async def list_models(
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> NumpyJSONResponse:
    names = [name for name in state.all_model_names() if cursor is None or name > cursor]
    page = names[:limit]
    items = [_with_active(state, state.model_info(name)) for name in page]
    next_cursor = page[-1] if len(names) > limit else None
    return NumpyJSONResponse({"items": items, "next_cursor": next_cursor})


@router.put(
    "/{name}",
    summary="Create or update a logits-only model",
    dependencies=AdminAccess,
    responses={409: {"description": "a TorchScript model or the active calibrator has another class count"}},
    openapi_extra=json_body(ModelSpec, examples={"cifar10": {"num_classes": 10}}),
)
async def put_model(name: ModelName, request: Request, state: State) -> NumpyJSONResponse:
    spec = await read_json(request, ModelSpec)
    if spec.class_names is not None and len(spec.class_names) != spec.num_classes:
        raise InvalidInput(
            f"class_names has {len(spec.class_names)} names for {spec.num_classes} classes",
            field="class_names",
        )
    if name in state.registry.names():
        loaded = state.registry.get(name)
        if loaded.num_classes is not None and loaded.num_classes != spec.num_classes:
            raise Conflict(f"model {name!r} is a TorchScript model with {loaded.num_classes} classes")
    active = state.active(name)
    if active.document is not None and active.document.get("num_classes") not in (None, spec.num_classes):
        raise Conflict(
            f"model {name!r} has an active calibrator for {active.document['num_classes']} classes; "
            "delete the model first to change its class count"
        )
    metadata = {"kind": "logits", **spec.model_dump(exclude_none=True)}
    if state.store.model_exists(name):
        old = state.store.get_model(name)
        metadata = {**old, **metadata, "kind": old.get("kind", "logits")}
    await run_in_threadpool(state.store.put_model, name, metadata)
    return NumpyJSONResponse(_with_active(state, state.model_info(name)))


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
async def put_torchscript(name: ModelName, request: Request, state: State) -> NumpyJSONResponse:
    data = await request.body()
    if not data:
        raise InvalidInput("the request body is empty; send the TorchScript file's bytes", field="body")
    metadata = state.store.get_model(name) if state.store.model_exists(name) else {}
    for key in ("input_shape", "class_names", "description"):
        header = request.headers.get(f"x-model-{key.replace('_', '-')}")
        if header:
            metadata[key] = header.split(",") if key == "class_names" else header
    if isinstance(metadata.get("input_shape"), str):
        try:
            metadata["input_shape"] = [int(part) for part in metadata["input_shape"].split(",")]
        except ValueError:
            raise InvalidInput(
                "X-Model-Input-Shape must be comma-separated integers", field="input_shape"
            ) from None
    # check first: a file that torch cannot load never replaces a working model
    checked = await run_in_threadpool(state.registry.check_bytes, name, data, metadata)
    metadata = {**metadata, "kind": "torchscript", "num_classes": checked.num_classes}
    await run_in_threadpool(state.store.put_model, name, metadata)
    await run_in_threadpool(state.store.put_torchscript, name, data)
    state.sync_uploaded_model(name)
    return NumpyJSONResponse(_with_active(state, state.model_info(name)))


@router.get("/{name}", summary="Model metadata and active calibrator", dependencies=ReadAccess)
async def get_model(name: ModelName, state: State) -> NumpyJSONResponse:
    return NumpyJSONResponse(_with_active(state, state.model_info(name)))


@router.delete(
    "/{name}",
    summary="Delete a model with its calibrators",
    dependencies=AdminAccess,
    status_code=204,
    responses={409: {"description": "the model is shipped in the models directory"}},
)
async def delete_model(name: ModelName, state: State) -> Response:
    state.model_info(name)  # 404 for an unknown model
    shipped = name in state.registry and (
        not state.store.model_exists(name) or state.store.torchscript_path(name) is None
    )
    if shipped:
        raise Conflict(f"model {name!r} is shipped in the models directory; remove its folder there instead")
    await run_in_threadpool(state.store.delete_model, name)
    with contextlib.suppress(NotFound):  # a logits-only model has nothing in the registry
        state.registry.remove(name)
    state.forget(name)
    return Response(status_code=204)
