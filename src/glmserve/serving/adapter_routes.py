"""LoRA adapters as served models: loaded at start (--lora) or at run time by admins, with vLLM's routes.

    POST /v1/load_lora_adapter    {"lora_name": "support", "lora_path": "/srv/adapters/support", "base_model": "chatglm"}
    POST /v1/unload_lora_adapter  {"lora_name": "support"}

An adapter is then a model of its own name on every route (`model` of the OpenAI routes, POST /<name> of
the classic one), listed by GET /v1/models with its base as `parent`; its requests run on the base
model's engine, batched with the base's and other adapters'.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from glmserve.serving.errors import InvalidRequest
from glmserve.serving.legacy_routes import add_classic_route, remove_classic_route
from glmserve.serving.registry import ModelRegistry, ServedModel
from glmserve.serving.settings import check_model_name, default_model_name


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    base_model: str | None = None  # default: the first served model


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's clients send it; names are what count here


def adapter_name(name: str | None, path: str) -> str:
    return check_model_name(name or default_model_name(Path(path).expanduser()))


async def load_adapter(registry: ModelRegistry, base_name: str | None, name: str, path: str) -> ServedModel:
    """Register the adapter on its base model's engine (ValueError naming a mismatch) and serve it."""
    base = registry.get(base_name)
    if base.base is not None:
        raise ValueError(f"{base.name!r} is itself an adapter: name a base model")
    if name in registry.models:
        raise ValueError(f"a model or adapter named {name!r} is already served")
    await base.engine.call(lambda engine: engine.add_lora(name, Path(path).expanduser()))
    adapter = base.adapter(name)
    registry.add(adapter)
    return adapter


async def unload_adapter(registry: ModelRegistry, name: str) -> None:
    adapter = registry.remove_adapter(name)
    try:
        await adapter.engine.call(lambda engine: engine.remove_lora(name))
    except ValueError:
        registry.add(adapter)  # still in use: keep serving it
        raise


def adapter_router() -> APIRouter:
    """The admin routes (the caller adds the admin check)."""
    router = APIRouter()

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> PlainTextResponse:
        registry = request.app.state.service.registry
        try:
            name = adapter_name(body.lora_name, body.lora_path)
            await load_adapter(registry, body.base_model, name, body.lora_path)
        except ValueError as error:
            raise InvalidRequest(str(error), param="lora_path") from None
        add_classic_route(request.app, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> PlainTextResponse:
        try:
            await unload_adapter(request.app.state.service.registry, body.lora_name)
        except ValueError as error:
            raise InvalidRequest(str(error), param="lora_name") from None
        remove_classic_route(request.app, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
