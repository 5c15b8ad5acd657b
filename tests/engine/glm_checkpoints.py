"""Tiny random ChatGLM3 / GLM-4 checkpoints (real configs scaled down, real tokenizers) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from glmserve.devtools.random_checkpoint import (
    CheckpointSpec,
    load_config,
    scale_config,
    write_random_checkpoint,
)

# head_dim 16 (rotary on 8 dims: 4 pairs), 4 query heads over 2 KV heads, rope_ratio != 1.
TINY_SIZES = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    multi_query_group_num=2,
    kv_channels=16,
    ffn_hidden_size=96,
    rope_ratio=3.0,
    seq_length=1024,
)


def write_tiny_checkpoint(
    out: Path,
    preset: str = "chatglm3-6b",
    layout: str = "chatglm",
    fmt: str = "safetensors",
    num_shards: int = 1,
    seed: int = 0,
    **sizes,
) -> Path:
    """float32 weights (std 0.1, so logits are far from uniform and greedy choices are clear)."""
    config, tokenizer_dirs = load_config(preset)
    spec = CheckpointSpec(
        config=scale_config(config, **{**TINY_SIZES, **sizes}),
        out=out,
        format=fmt,
        num_shards=num_shards,
        seed=seed,
        dtype=torch.float32,
        std=0.1,
        layout=layout,
        tokenizer_dirs=tokenizer_dirs,
    )
    write_random_checkpoint(spec)
    return out
