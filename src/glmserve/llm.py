"""The offline entry point, shaped like vLLM's: LLM(...).generate / chat / stream."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from glmserve.chat.defaults import GenerationDefaults, model_generation_defaults
from glmserve.config import EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.lora import UnknownAdapterError
from glmserve.engine.outputs import CompletionOutput, RequestOutput, StreamOutput
from glmserve.engine.sampling_params import SamplingParams
from glmserve.model_path import resolve_model_path
from glmserve.tokenization import Tokenizer, load_tokenizer
from glmserve.tokenization.detokenize import TextDetokenizer

PromptType = str | dict[str, Any] | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Load a model (a .gguf file or a Hugging Face folder; default: MODEL_PATH, then the bundled
    SmolLM2) and run batches of prompts together on the same forward passes."""

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str = "auto",
        lora_modules: dict[str, str | Path] | None = None,
        **engine_options: Any,
    ):
        """lora_modules: adapter name -> folder (peft LoRA or prefix tuning, ChatGLM P-Tuning v2), each
        chosen per call by `lora=name`."""
        self.model_path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(self.model_path)
        config = EngineConfig(dtype=dtype, **engine_options)
        self.engine = LLMEngine(self.model_path, config, TextDetokenizer(self.tokenizer))
        for name, path in (lora_modules or {}).items():
            self.engine.add_lora(name, path)
        self._request_ids = itertools.count()

    def add_lora(self, name: str, path: str | Path) -> None:
        """Serve another LoRA adapter on this model, chosen by `lora=name`."""
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def with_lora(self, name: str) -> LoRAView:
        """This LLM with `name` as every call's adapter (for code written against one model)."""
        if name not in self.engine.loras:  # now, not at the first call
            raise UnknownAdapterError(name)
        return LoRAView(self, name)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """The model family's default max_length / temperature / top_p (see chat/defaults.py)."""
        return model_generation_defaults(self.engine.model_config, self.max_model_len)

    # -- batch APIs ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Prompts are text (special tokens in it are recognised), {"prompt": text} or
        {"prompt_token_ids": [...]}; outputs come back in input order. `lora`: the adapter of all
        prompts, or one per prompt (None: the base model); all run in the same batches."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self._prompt_token_ids(p) for p in prompts]
        texts = [p if isinstance(p, str) else (p.get("prompt") if isinstance(p, dict) else None) for p in prompts]
        return self._run_batch(token_lists, texts, sampling_params, use_tqdm, lora)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them, formatted by the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        token_lists = [
            tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self._run_batch(token_lists, [None] * len(token_lists), sampling_params, use_tqdm, lora)

    # -- streaming ----------------------------------------------------------------------------
    def stream(
        self, prompt: PromptType, sampling_params: SamplingParams | None = None, lora: str | None = None
    ) -> Iterator[StreamOutput]:
        """Yield outputs as tokens come (of every choice: `out.index`); closing the iterator early
        aborts the request."""
        request_id = f"stream-{next(self._request_ids)}"
        params = sampling_params or SamplingParams()
        self.engine.add_request(request_id, self._prompt_token_ids(prompt), params, lora)
        num_running = params.n
        try:
            while num_running:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        num_running -= out.finished
                        yield out
        finally:
            if num_running:
                self.engine.abort(request_id)

    def stream_chat(
        self, messages: Messages, sampling_params: SamplingParams | None = None, lora: str | None = None
    ) -> Iterator[StreamOutput]:
        return self.stream(self.get_tokenizer().apply_chat_template(messages), sampling_params, lora)

    # -- internals ----------------------------------------------------------------------------
    def _prompt_token_ids(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            return self.get_tokenizer().encode(prompt, add_special_tokens=True, parse_special=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._prompt_token_ids(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def _run_batch(self, token_lists, texts, sampling_params, use_tqdm: bool, lora=None) -> list[RequestOutput]:
        """One engine request per prompt; the engine runs its n choices (engine/llm_engine.py)."""
        params = _broadcast_params(sampling_params, len(token_lists))
        loras = [lora] * len(token_lists) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(token_lists):
            raise ValueError(f"{len(loras)} adapters for {len(token_lists)} prompts")
        requests: dict[str, RequestOutput] = {}
        try:
            for ids, text, p, adapter in zip(token_lists, texts, params, loras, strict=True):
                request_id = f"{next(self._request_ids)}"
                choices = [CompletionOutput(j, logprobs=[] if p.logprobs is not None else None) for j in range(p.n)]
                self.engine.add_request(request_id, ids, p, adapter)
                requests[request_id] = RequestOutput(request_id, text, ids, choices)
            self._drain(requests, use_tqdm)
        except BaseException:
            for request_id in requests:
                self.engine.abort(request_id)
            raise
        return list(requests.values())

    def _drain(self, requests: dict[str, RequestOutput], use_tqdm: bool) -> None:
        num_running = len(requests)
        with tqdm(total=num_running, disable=not use_tqdm, desc="generating", unit="req") as progress:
            while num_running:
                for out in self.engine.step():
                    request = requests[out.request_id]
                    request.add(out)
                    if request.finished and out.finished:
                        num_running -= 1
                        progress.update(1)


class LoRAView:
    """An LLM whose generate / chat / stream run on one LoRA adapter; everything else is the LLM's."""

    def __init__(self, llm: LLM, lora: str):
        self._llm, self.lora = llm, lora

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        return self._llm.generate(prompts, sampling_params, use_tqdm, lora=self.lora)

    def chat(self, messages, sampling_params=None, tools=None, add_generation_prompt: bool = True, use_tqdm: bool = False):
        return self._llm.chat(messages, sampling_params, tools, add_generation_prompt, use_tqdm, lora=self.lora)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[StreamOutput]:
        return self._llm.stream(prompt, sampling_params, lora=self.lora)

    def stream_chat(self, messages: Messages, sampling_params: SamplingParams | None = None) -> Iterator[StreamOutput]:
        return self._llm.stream_chat(messages, sampling_params, lora=self.lora)


def _broadcast_params(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"{len(sampling_params)} sampling params for {count} prompts")
    return list(sampling_params)
