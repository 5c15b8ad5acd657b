"""The served models: name -> AsyncEngine, tokenizer and the family's generation defaults.

Engines are built here only when the app is not handed ready ones; the engine modules (and so
torch) are imported inside `load_model`, never at import time of the serving layer. The engine
gets text through a TextDetokenizer of the model's tokenizer; the tokenizer itself stays here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from glmserve.chat.defaults import GenerationDefaults, model_generation_defaults
from glmserve.serving.errors import ModelNotFound
from glmserve.serving.settings import ServeSettings, check_model_name
from glmserve.tokenization import Tokenizer, load_tokenizer
from glmserve.tokenization.detokenize import TextDetokenizer

if TYPE_CHECKING:
    from glmserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    defaults: GenerationDefaults
    is_owned: bool = True  # built by us, so shut down by us
    base: ServedModel | None = None  # set for an adapter served under its own name on this base's engine
    created: int = field(default_factory=lambda: int(time.time()))
    num_unfinished: int = 0  # sequences admitted and not finished; touched by the event loop only
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def max_sequence_len(self) -> int:
        """Prompt plus answer tokens one sequence can hold: the context, or less if the KV cache is smaller."""
        return min(self.max_model_len, self.engine.engine.kv_cache_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text, for logprobs; cached because the same ids come back all the time."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    @property
    def lora(self) -> str | None:
        """The adapter the engine runs this model's requests with (None: the base model)."""
        return self.name if self.base is not None else None

    def adapter(self, name: str) -> ServedModel:
        """This base model run with its adapter `name`, served as a model of that name."""
        return ServedModel(name, self.engine, self.tokenizer, self.defaults, is_owned=False, base=self)

    def stats(self) -> dict[str, float]:
        block_manager = self.engine.engine.block_manager
        return {
            **self.engine.stats(),
            "num_unfinished": self.num_unfinished,
            "num_free_blocks": block_manager.num_free_blocks,
            "num_blocks": block_manager.num_blocks,
        }


class ModelRegistry:
    """Served models in order; the first one is the default."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("no model to serve")
        self.models = {m.name: m for m in models}
        if len(self.models) != len(models):
            names = [m.name for m in models]
            raise ValueError(f"two models share a name in {names}: name them with --model NAME=PATH")

    @property
    def base_models(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.base is None]

    def add(self, model: ServedModel) -> None:
        if model.name in self.models:
            raise ValueError(f"a model or adapter named {model.name!r} is already served")
        self.models[model.name] = model

    def remove_adapter(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None or model.base is None:
            raise ModelNotFound(f"no LoRA adapter named {name!r} is served", param="lora_name")
        return self.models.pop(name)

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    def get(self, name: str | None) -> ServedModel:
        if not name:
            return self.default
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not served; served: {sorted(self.models)}", param="model")
        return model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())

    def stats(self) -> dict[str, dict[str, float]]:
        return {model.name: model.stats() for model in self.base_models}

    def shutdown(self) -> None:
        for model in self.base_models:
            if model.is_owned:
                model.engine.shutdown()


def load_model(name: str, path: Path, settings: ServeSettings) -> ServedModel:
    from glmserve.engine.async_engine import AsyncEngine  # imports torch: only when serving
    from glmserve.engine.llm_engine import LLMEngine

    logger.info("loading model %s from %s", name, path)
    tokenizer = load_tokenizer(path)
    detokenizer = TextDetokenizer(tokenizer)
    engine = AsyncEngine(lambda: LLMEngine(path, settings.engine_config(), detokenizer))  # loads on its thread
    return _served(name, engine, tokenizer)


def wrap_engines(engines: Mapping[str, tuple[AsyncEngine, Tokenizer]]) -> list[ServedModel]:
    """Engines handed in by the caller with their tokenizers (tests, an embedding program): served
    as they are, never shut down here."""
    return [_served(check_model_name(name), engine, tokenizer, is_owned=False)
            for name, (engine, tokenizer) in engines.items()]  # fmt: skip


def _served(name: str, engine: AsyncEngine, tokenizer: Tokenizer, is_owned: bool = True) -> ServedModel:
    defaults = model_generation_defaults(engine.engine.model_config, engine.engine.max_model_len)
    return ServedModel(name, engine, tokenizer, defaults, is_owned)
