"""Batched sampling: grammar masks, penalties, temperature, top-k, top-p, per-request seeds, logprobs.

All rows are handled by batched tensor ops; the only per-row loop draws seeded noise for
requests that asked for a seed (each has its own generator, so its output does not depend
on what else is in the batch). Sampling uses the exponential race
argmax(p / E), E ~ Exp(1), which draws exactly from p without a cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.kernels import native
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.structured_output import allowed_tokens


@dataclass
class SamplingBatch:
    """Per-row sampling settings as tensors, built once per step by the model runner."""

    temperature: torch.Tensor  # [N] float32, 0 for greedy rows
    top_p: torch.Tensor  # [N]
    top_k: torch.Tensor  # [N] int64, 0 = off
    repetition_penalty: torch.Tensor | None  # [N], None when all rows are 1
    presence_penalty: torch.Tensor | None  # [N]
    frequency_penalty: torch.Tensor | None  # [N]
    seen_token_ids: torch.Tensor | None  # [N, S] prompt+output ids padded with -1, for penalties
    output_token_ids: torch.Tensor | None  # [N, S'] output ids padded with -1, for presence/frequency
    banned_token_ids: torch.Tensor | None  # [N, B] ids masked out (stop ids before min_tokens), -1 pad
    generators: list[torch.Generator | None]
    # Rows under a grammar (structured output) and their allowed tokens as bits: [M], [M, ceil(V/32)]
    grammar_rows: torch.Tensor | None = None
    grammar_bitmask: torch.Tensor | None = None
    num_logprobs: int = -1  # max top-k logprobs over the rows; -1 when no row wants them
    all_greedy: bool = True
    any_top_p_or_k: bool = False


def build_sampling_batch(
    params: list[SamplingParams],
    seen: list[list[int]],
    outputs: list[list[int]],
    banned: list[list[int]],
    generators: list[torch.Generator | None],
    device: torch.device,
    grammar_rows: list[int] | None = None,
    grammar_bitmask: torch.Tensor | None = None,
) -> SamplingBatch:
    """`grammar_bitmask` [M, ceil(V/32)] int32 (structured_output.fill_bitmasks) holds the allowed
    tokens of rows `grammar_rows`; other rows are not masked and pay nothing."""
    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    any_rep = any(p.repetition_penalty != 1.0 for p in params)
    any_pf = any(p.presence_penalty or p.frequency_penalty for p in params)
    return SamplingBatch(
        temperature=column([p.temperature for p in params]),
        top_p=column([p.top_p for p in params]),
        top_k=column([p.top_k for p in params], torch.int64),
        repetition_penalty=column([p.repetition_penalty for p in params]) if any_rep else None,
        presence_penalty=column([p.presence_penalty for p in params]) if any_pf else None,
        frequency_penalty=column([p.frequency_penalty for p in params]) if any_pf else None,
        seen_token_ids=_pad(seen, device) if any_rep else None,
        output_token_ids=_pad(outputs, device) if any_pf else None,
        banned_token_ids=_pad(banned, device) if any(banned) else None,
        generators=generators,
        grammar_rows=torch.tensor(grammar_rows, device=device) if grammar_rows else None,
        grammar_bitmask=grammar_bitmask.to(device, non_blocking=True) if grammar_rows else None,
        num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        all_greedy=all(p.is_greedy for p in params),
        any_top_p_or_k=any(p.top_p < 1.0 or p.top_k > 0 for p in params),
    )


def _pad(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def _token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, S] ids padded with -1 -> [N, V] counts (padding lands in an extra column, dropped)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids.where(ids >= 0, vocab_size), torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_grammar_masks(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Tokens a row's grammar does not allow next get -inf. In place, unless logprobs are wanted
    (they are the model's own, from the unmasked logits)."""
    if batch.grammar_rows is None:
        return logits
    rows = batch.grammar_rows
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() and native.load():
        out = logits.clone() if batch.num_logprobs >= 0 else logits
        torch.ops.glmserve.apply_token_bitmask_(out, rows, batch.grammar_bitmask)
        return out
    allowed = allowed_tokens(batch.grammar_bitmask, logits.shape[1])
    masked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy(0, rows, masked)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    vocab_size = logits.shape[1]
    if batch.banned_token_ids is not None:
        banned = _token_counts(batch.banned_token_ids, vocab_size) > 0
        logits = logits.masked_fill(banned, float("-inf"))
    if batch.repetition_penalty is not None:  # CTRL (Keskar et al., 2019): divide positive, multiply negative
        seen = _token_counts(batch.seen_token_ids, vocab_size) > 0
        penalty = batch.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if batch.presence_penalty is not None:  # OpenAI's definition
        counts = _token_counts(batch.output_token_ids, vocab_size)
        logits = logits - batch.frequency_penalty[:, None] * counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0).float()
    return logits


def _top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits with everything outside each row's top-k and top-p nucleus set to -inf."""
    sorted_logits, sorted_ids = logits.sort(-1, descending=True)
    vocab_size = logits.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)  # [N]
    ranks = torch.arange(vocab_size, device=logits.device)
    remove = ranks[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
    # keep a token if the mass before it is < top_p (the first token is always kept)
    mass_before = probs.cumsum(-1) - probs
    remove |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_ids, sorted_logits)


def _exponential_noise(shape, generators, device) -> torch.Tensor:
    noise = torch.empty(shape, device=device).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 -> (token ids [N], the processed logits used for sampling). Grammar
    rows of `logits` are masked in place unless the batch wants logprobs."""
    logits = apply_penalties(apply_grammar_masks(logits, batch), batch)
    greedy_ids = argmax_rows(logits)
    if batch.all_greedy:
        return greedy_ids, logits
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]
    if batch.any_top_p_or_k:
        scaled = _top_k_top_p_mask(scaled, batch.top_k, batch.top_p)
    probs = scaled.softmax(-1)
    noise = _exponential_noise(probs.shape, batch.generators, probs.device)
    sampled_ids = argmax_rows(probs / noise)
    return torch.where(batch.temperature > 0, sampled_ids, greedy_ids), logits


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N]: torch.argmax(x, -1), natively on CPU where the kernels load (aten's is a
    scalar loop: ~0.35 ms of a 16-row step of the bundled model)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.shape[1] and native.load():
        return torch.ops.glmserve.argmax_rows(x)
    return x.argmax(-1)


def topk_logprobs(
    logits: torch.Tensor, chosen_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-model logprobs: (chosen logprob [N], top-k logprobs [N, k], top-k ids [N, k])."""
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(1, chosen_ids[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(k, -1) if k > 0 else (logprobs[:, :0], chosen_ids[:, None][:, :0])
    return chosen, top_values, top_ids
