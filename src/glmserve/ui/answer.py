"""Stream one answer into a conversation through the in-process ChatService (no gradio here).

Stopping: the Stop button sets the session's asyncio.Event; the loop sees it at the next output,
leaves the service's stream and so closes it, which aborts the engine request and frees its KV
blocks. A closed browser tab cancels the task instead, which closes the stream the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from glmserve.serving.service import ChatService
from glmserve.ui.conversation import AnswerStats, Conversation, model_messages


@dataclass(frozen=True)
class AnswerOptions:
    model: str | None
    max_length: int
    temperature: float
    top_p: float


async def stream_answer(
    service: ChatService, conversation: Conversation, options: AnswerOptions, stop: asyncio.Event
) -> AsyncIterator[Conversation]:
    """Append an assistant message to `conversation` and yield it after each engine step.
    Raises APIError (before the first yield) for a request the service refuses."""
    served = service.model(options.model)
    prompt_ids = service.chat_prompt_ids(served, model_messages(conversation))
    params = service.sampling_params(
        served, len(prompt_ids), options.max_length, temperature=options.temperature, top_p=options.top_p
    )
    stats = AnswerStats(
        served.name, options.max_length, params.max_tokens, params.temperature, params.top_p, len(prompt_ids)
    )
    answer = {"role": "assistant", "content": "", "stats": stats.as_dict()}
    conversation["messages"].append(answer)
    start = time.monotonic()
    async with aclosing(service.generate(served, [prompt_ids], [params])) as events:
        async for _, out in events:
            answer["content"] += out.text_delta
            stats.num_answer_tokens += len(out.new_token_ids)
            stats.num_prompt_tokens = out.num_prompt_tokens or stats.num_prompt_tokens
            stats.tokens_per_s = stats.num_answer_tokens / max(time.monotonic() - start, 1e-6)
            stats.finish = out.finish_reason if out.finished else None
            if stop.is_set() and not out.finished:
                stats.finish = "stopped"
            answer["stats"] = stats.as_dict()
            yield conversation
            if stats.finish:
                break
