"""The offline entry point, shaped like vLLM's: LLM(...).generate / chat / stream."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from glmserve.chat.defaults import GenerationDefaults, generation_defaults, read_generation_config
from glmserve.config import EngineConfig
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.outputs import CompletionOutput, RequestOutput, StreamOutput
from glmserve.engine.sampling_params import SamplingParams
from glmserve.model_path import resolve_model_path
from glmserve.tokenization import Tokenizer

PromptType = str | dict[str, Any] | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Load a model (a .gguf file or a Hugging Face folder; default: MODEL_PATH, then the bundled
    SmolLM2) and run batches of prompts together on the same forward passes."""

    def __init__(self, model: str | Path | None = None, dtype: str = "auto", **engine_options: Any):
        self.model_path = resolve_model_path(model)
        self.engine = LLMEngine(self.model_path, EngineConfig(dtype=dtype, **engine_options))
        self._request_ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """The model family's default max_length / temperature / top_p (see chat/defaults.py)."""
        model_config = self.engine.model_config
        model_type = model_config.extra.get("model_type", model_config.architecture)
        generation_config = read_generation_config(self.model_path)
        return generation_defaults(model_type, self.max_model_len, generation_config, model_config.vocab_size)

    # -- batch APIs ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Prompts are text (special tokens in it are recognised), {"prompt": text} or
        {"prompt_token_ids": [...]}; outputs come back in input order."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self._prompt_token_ids(p) for p in prompts]
        texts = [p if isinstance(p, str) else (p.get("prompt") if isinstance(p, dict) else None) for p in prompts]
        return self._run_batch(token_lists, texts, sampling_params, use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them, formatted by the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        token_lists = [
            tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self._run_batch(token_lists, [None] * len(token_lists), sampling_params, use_tqdm)

    # -- streaming ----------------------------------------------------------------------------
    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[StreamOutput]:
        """Yield outputs as tokens come; closing the iterator early aborts the request."""
        request_id = f"stream-{next(self._request_ids)}"
        self.engine.add_request(request_id, self._prompt_token_ids(prompt), sampling_params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(request_id)

    def stream_chat(self, messages: Messages, sampling_params: SamplingParams | None = None) -> Iterator[StreamOutput]:
        return self.stream(self.get_tokenizer().apply_chat_template(messages), sampling_params)

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

    def _run_batch(self, token_lists, texts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        params = _broadcast_params(sampling_params, len(token_lists))
        results: list[RequestOutput] = []
        owners: dict[str, tuple[RequestOutput, CompletionOutput]] = {}
        try:
            for ids, text, p in zip(token_lists, texts, params, strict=True):
                request = RequestOutput(f"{next(self._request_ids)}", text, ids, [], prompt_logprobs=None)
                results.append(request)
                for index in range(p.n):
                    completion = CompletionOutput(index, "", [], logprobs=[] if p.logprobs is not None else None)
                    request.outputs.append(completion)
                    sub_id = f"{request.request_id}-{index}"
                    owners[sub_id] = (request, completion)
                    self.engine.add_request(sub_id, ids, _choice_params(p, index))
            self._drain(owners, len(results), use_tqdm)
        except BaseException:
            for sub_id in owners:
                self.engine.abort(sub_id)
            raise
        return results

    def _drain(self, owners, num_requests: int, use_tqdm: bool) -> None:
        remaining = {request.request_id: len(request.outputs) for request, _ in owners.values()}
        with tqdm(total=num_requests, disable=not use_tqdm, desc="generating", unit="req") as progress:
            while remaining:
                for out in self.engine.step():
                    request, completion = owners[out.request_id]
                    _accumulate(request, completion, out)
                    if out.finished:
                        remaining[request.request_id] -= 1
                        if remaining[request.request_id] == 0:
                            del remaining[request.request_id]
                            request.finished = True
                            progress.update(1)


def _accumulate(request: RequestOutput, completion: CompletionOutput, out: StreamOutput) -> None:
    completion.token_ids.extend(out.new_token_ids)
    completion.text += out.text_delta
    if out.logprobs is not None:
        completion.logprobs.extend(out.logprobs)
        chosen = sum(entry[t] for entry, t in zip(out.logprobs, out.new_token_ids, strict=True))
        completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + chosen
    if out.prompt_logprobs is not None:
        request.prompt_logprobs = out.prompt_logprobs
    request.num_cached_tokens = max(request.num_cached_tokens, out.num_cached_tokens)
    if out.finished:
        completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice j of n draws with seed + j, so seeded choices differ yet repeat (as the server does)."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def _broadcast_params(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"{len(sampling_params)} sampling params for {count} prompts")
    return list(sampling_params)
