"""Per-step attention metadata from plain lists: built once, shared by every layer."""

from __future__ import annotations

import numpy as np
import torch

from glmserve.engine.layers.attention import AttentionMetadata


def build_attention_metadata(
    slots: np.ndarray,  # [T] cache slot of each new token, decode tokens first
    decode_tables: list[list[int]],
    decode_context_lens: list[int],  # keys each decode attends to, its own new token included
    prefill_tables: list[list[int]],
    prefill_starts: list[int],  # tokens already in the cache before each chunk
    prefill_q_lens: list[int],  # tokens in each chunk
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> AttentionMetadata:
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(device),
        num_decode_tokens=len(decode_tables),
        decode_block_tables=None,
        decode_context_lens=None,
        decode_mask=None,
        prefill_block_tables=None,
        prefill_mask=None,
        prefill_pad_index=None,
        prefill_unpad_index=None,
    )
    if decode_tables:
        meta.decode_block_tables = block_tables(decode_tables, device)
        meta.decode_context_lens = torch.tensor(decode_context_lens, dtype=torch.int64, device=device)
        num_keys = meta.decode_block_tables.shape[1] * block_size
        if min(decode_context_lens) < num_keys:  # some keys are padding past a context's end
            key_index = torch.arange(num_keys, device=device)
            visible = key_index[None, :] < torch.tensor(decode_context_lens, device=device)[:, None]  # [B, L]
            mask = torch.zeros(visible.shape, dtype=dtype, device=device)
            meta.decode_mask = mask.masked_fill_(~visible, float("-inf"))[None, :, None, :]  # [1, B, 1, L]
    if prefill_tables:
        _add_prefill(meta, prefill_tables, prefill_starts, prefill_q_lens, block_size, device)
    return meta


def _add_prefill(meta, tables, starts: list[int], q_lens: list[int], block_size: int, device) -> None:
    meta.prefill_is_fresh = len(tables) == 1 and starts[0] == 0  # layers without ALiBi skip the gather
    p, max_q = len(tables), max(q_lens)
    meta.prefill_max_q = max_q
    meta.prefill_block_tables = block_tables(tables, device)
    q_index = torch.arange(max_q, device=device)
    offsets = torch.tensor(np.cumsum([0] + q_lens[:-1]), device=device)
    is_real = q_index[None, :] < torch.tensor(q_lens, device=device)[:, None]  # [P, max_q]
    meta.prefill_pad_index = torch.where(is_real, offsets[:, None] + q_index[None, :], 0).flatten()
    meta.prefill_unpad_index = (torch.arange(p, device=device)[:, None] * max_q + q_index[None, :])[is_real]
    q_pos = torch.tensor(starts, device=device)[:, None] + q_index[None, :]  # [P, max_q]
    q_pos = torch.where(is_real, q_pos, 0)  # padded rows see key 0 only: no all-masked rows
    key_pos = torch.arange(meta.prefill_block_tables.shape[1] * block_size, device=device)
    meta.prefill_mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [P, 1, max_q, L]


def block_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Rows padded with block 0 (always zeroed; padded keys are masked out)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
