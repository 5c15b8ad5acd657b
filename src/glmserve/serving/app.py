"""The app factory: one FastAPI app serving every model, the engines started in its lifespan.

    app = create_app(ServeSettings(model=["chat=path/to/model.gguf"]))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Or with engines built by the caller (tests, an embedding program), which then own them, each with
its tokenizer (the engine gets text through a TextDetokenizer of it):

    tokenizer = load_tokenizer(path)
    engine = AsyncEngine(lambda: LLMEngine(path, EngineConfig(), TextDetokenizer(tokenizer)))
    app = create_app(settings, engines={"smol": (engine, tokenizer)})

The web UI is mounted by whoever builds the app (`glmserve serve`: cli/serve.py); this layer
never imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from glmserve.model_path import resolve_model_path
from glmserve.serving.adapter_routes import adapter_name, adapter_router, load_adapter
from glmserve.serving.auth import admin_checker, api_key_checker
from glmserve.serving.errors import install_error_handlers
from glmserve.serving.legacy_routes import classic_router
from glmserve.serving.logs import StartupError
from glmserve.serving.metrics import CONTENT_TYPE, ServerMetrics
from glmserve.serving.middleware import RequestContextMiddleware
from glmserve.serving.openai_routes import router as openai_router
from glmserve.serving.registry import ModelRegistry, ServedModel, load_model, wrap_engines
from glmserve.serving.service import ChatService
from glmserve.serving.settings import (
    ModelSpec,
    ServeSettings,
    check_model_name,
    default_model_name,
    is_loopback,
    parse_lora_spec,
    parse_model_spec,
)
from glmserve.serving.streaming import ClientDisconnected, client_disconnected_response

if TYPE_CHECKING:
    from glmserve.engine.async_engine import AsyncEngine
    from glmserve.tokenization import Tokenizer

logger = logging.getLogger(__name__)


def create_app(
    settings: ServeSettings, engines: Mapping[str, tuple[AsyncEngine, Tokenizer]] | None = None
) -> FastAPI:
    """The API app; `app.state.model_names` lists the served names (for the UI's model picker)."""
    named_paths = None if engines else resolve_models(settings)
    model_names = list(engines) if engines else list(named_paths)
    adapters = resolve_adapters(settings, model_names)
    served_names = model_names + [name for _, name, _ in adapters]
    state: dict = {}  # the registry, once the lifespan has loaded the models

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models = (
            wrap_engines(engines) if engines else await asyncio.to_thread(_load_all, named_paths, settings)
        )
        registry = state["registry"] = ModelRegistry(models)
        for base, name, path in adapters:
            try:
                await load_adapter(registry, base, name, path)
            except ValueError as error:
                await asyncio.to_thread(registry.shutdown)
                raise StartupError(f"--lora {name}: {error}") from None
        app.state.service = ChatService(registry, settings.max_queue, metrics)
        logger.info("serving %s", ", ".join(f"{m.name} ({m.max_model_len} tokens)" for m in registry))
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish (or timed them out) by now
            await asyncio.to_thread(registry.shutdown)
            logger.info("engines stopped")

    metrics = ServerMetrics(lambda: state["registry"].stats() if "registry" in state else {})
    app = FastAPI(title="glmserve", version=_version(), lifespan=lifespan)
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, client_disconnected_response)
    protected = [Depends(api_key_checker(settings.all_keys))]
    app.include_router(openai_router, dependencies=protected)
    admin = [*protected, Depends(admin_checker(settings.api_key, settings.admin_key, is_loopback(settings.host)))]
    app.include_router(adapter_router(), dependencies=admin)
    app.include_router(_ops_router(metrics), dependencies=protected)
    app.include_router(_health_router())
    app.state.classic_dependencies = protected  # also for adapters' routes added while serving
    app.include_router(classic_router(served_names), dependencies=protected)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestContextMiddleware, record=metrics.record_request)
    app.state.model_names = served_names
    return app


def resolve_models(settings: ServeSettings) -> dict[str, Path]:
    """name -> path for each --model, before anything loads, so bad names or paths fail fast."""
    specs = [parse_model_spec(spec) for spec in settings.model] or [ModelSpec(None, None)]
    named_paths: dict[str, Path] = {}
    for spec in specs:
        path = resolve_model_path(spec.path)
        name = check_model_name(spec.name or default_model_name(path))
        if name in named_paths:
            raise ValueError(f"two models are named {name!r}: name them with --model NAME=PATH")
        named_paths[name] = path
    return named_paths


def resolve_adapters(settings: ServeSettings, model_names: list[str]) -> list[tuple[str, str, str]]:
    """(base, name, folder) for each --lora, checked before anything loads."""
    adapters, names = [], set(model_names)
    for spec in map(parse_lora_spec, settings.lora):
        base = spec.base or model_names[0]
        if base not in model_names:
            raise ValueError(f"--lora {spec.base}:{spec.name}: no model is named {base!r}; served: {model_names}")
        if not Path(spec.path).expanduser().is_dir():
            raise ValueError(f"--lora: adapter folder {spec.path} does not exist")
        name = adapter_name(spec.name, spec.path)
        if name in names:
            raise ValueError(f"--lora: two models or adapters are named {name!r}: name it with --lora NAME=DIR")
        names.add(name)
        adapters.append((base, name, spec.path))
    return adapters


def _load_all(named_paths: dict[str, Path], settings: ServeSettings) -> list[ServedModel]:
    return [load_model(name, path, settings) for name, path in named_paths.items()]


def _ops_router(metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router


def _health_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> dict:
        """Liveness plus each model's load, including free KV blocks (idle: all of them)."""
        registry = request.app.state.service.registry
        return {"status": "ok", "models": registry.stats()}

    return router


def _version() -> str:
    from glmserve import __version__

    return __version__
