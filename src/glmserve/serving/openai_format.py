"""OpenAI response bodies as plain dicts (built per token, so no pydantic on the hot path):
logprobs in the chat and the completions shapes, usage, and finish reasons."""

from __future__ import annotations

from collections.abc import Sequence

from glmserve.engine.outputs import PositionLogprobs
from glmserve.serving.registry import ServedModel
from glmserve.serving.service import Completion

MIN_LOGPROB = -9999.0  # JSON has no -Infinity; OpenAI clamps the same way


def finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:k]


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _chat_token(model: ServedModel, token_id: int, logprob: float) -> dict:
    text = model.token_text(token_id)
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}


def chat_logprobs(
    model: ServedModel, token_ids: Sequence[int], logprobs: Sequence[PositionLogprobs], k: int
) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...]}]} for these tokens."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        item = _chat_token(model, token_id, entry[token_id])
        item["top_logprobs"] = [_chat_token(model, t, lp) for t, lp in _top(entry, k)]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    model: ServedModel,
    token_ids: Sequence[int],
    logprobs: Sequence[PositionLogprobs],
    k: int,
    text_offset: int,
) -> dict:
    """The legacy shape: parallel lists of tokens, their logprobs, top-k maps and text offsets."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        text = model.token_text(token_id)
        tokens.append(text)
        token_logprobs.append(_logprob(entry[token_id]))
        tops.append({model.token_text(t): _logprob(lp) for t, lp in _top(entry, k)})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def usage_of(completions: Sequence[Completion], num_prompts: int = 1) -> dict:
    """Each prompt counted once however many choices it has, as OpenAI does."""
    n = len(completions) // num_prompts
    first_of_each = completions[::n]
    return usage(
        sum(c.num_prompt_tokens for c in first_of_each),
        sum(len(c.token_ids) for c in completions),
        sum(c.num_cached_tokens for c in first_of_each),
    )


def _plain_message(text: str, reason: str | None) -> tuple[dict, str | None]:
    return {"role": "assistant", "content": text, "tool_calls": []}, reason


def chat_response(
    request_id: str,
    created: int,
    model: ServedModel,
    completions: list[Completion],
    k: int | None,
    to_message=_plain_message,  # (text, finish_reason) -> (message, finish_reason): tool calls
):
    choices = []
    for c in completions:
        logprobs = chat_logprobs(model, c.token_ids, c.logprobs, k) if c.logprobs is not None else None
        message, reason = to_message(c.text, finish_reason(c.finish_reason))
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
                "stop_reason": c.stop_reason,
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "choices": choices,
        "usage": usage_of(completions),
    }


def completion_response(
    request_id: str,
    created: int,
    model: ServedModel,
    completions: list[Completion],
    echoes: list[str],
    k: int | None,
    num_prompts: int,
) -> dict:
    choices = []
    for c in completions:
        logprobs = (
            completion_logprobs(model, c.token_ids, c.logprobs, k, 0) if c.logprobs is not None else None
        )
        choices.append(
            {
                "index": c.index,
                "text": echoes[c.index] + c.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(c.finish_reason),
                "stop_reason": c.stop_reason,
            }
        )
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "choices": choices,
        "usage": usage_of(completions, num_prompts),
    }
