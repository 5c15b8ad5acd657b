"""Open a checkpoint (a `.gguf` file or a Hugging Face folder) and stream its weights.

    ckpt = open_checkpoint(path)
    ckpt.config                                   # ModelConfig
    for name, tensor in ckpt.iter_tensors(torch.bfloat16):
        params[name].copy_(tensor)                # one tensor alive at a time

Names are the checkpoint's Hugging Face names (`model.layers.0.self_attn.q_proj.weight`);
GGUF names are mapped to the Llama ones and llama.cpp's q/k row permutation is undone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from glmserve.config import EngineConfig, ModelConfig
from glmserve.engine.checkpoint.gguf import is_gguf_file, open_gguf, read_gguf_metadata
from glmserve.engine.checkpoint.hf import open_hf_folder
from glmserve.engine.checkpoint.quantized import is_quantized_folder, open_quantized
from glmserve.engine.layers.quant import QuantWeight

__all__ = ["Checkpoint", "open_checkpoint", "read_gguf_metadata", "weight_quantization"]


class Checkpoint(Protocol):
    config: ModelConfig
    path: Path
    format: str  # "gguf" | "safetensors" | "bin" | "glmserve-quantized"
    # How the file stores its linear weights when it was written quantized (`glmserve quantize`:
    # "int4" | "int8", with its group size); None for float weights and for GGUF's own block types.
    quantization: str | None
    group_size: int | None

    def iter_tensors(
        self, dtype: torch.dtype, keep_quantized: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
        """Yield (Hugging Face name, tensor) one at a time; float tensors already in `dtype`.
        Quantized weights come as QuantWeight: a pre-quantized folder's always, a GGUF's 4-bit and
        Q8_0 blocks with `keep_quantized` (exactly, else dequantized to `dtype`). A tied output
        head (config.tie_word_embeddings) yields no `lm_head.weight`."""
        ...


def weight_quantization(checkpoint: Checkpoint, config: EngineConfig) -> tuple[str | None, int]:
    """The scheme and group size linear weights run with: a pre-quantized checkpoint's own (it runs
    as it was written), else the engine's --quantization. The runner and the memory estimate both
    ask here."""
    if checkpoint.quantization is not None:
        return checkpoint.quantization, checkpoint.group_size or config.quantization_group_size
    return config.quantization, config.quantization_group_size


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read the config of a `.gguf` file or a Hugging Face folder; weights are read by iter_tensors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if is_quantized_folder(path):
        return open_quantized(path, open_hf_folder(path).config)
    if path.is_dir():
        return open_hf_folder(path)
    if is_gguf_file(path):
        return open_gguf(path)
    raise ValueError(
        f"unsupported model file {path}: expected a .gguf file or a Hugging Face checkpoint folder"
    )
