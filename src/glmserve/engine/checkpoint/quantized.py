"""Pre-quantized checkpoints: write once with `glmserve quantize`, start fast afterwards.

A quantized folder is a Hugging Face folder (config.json, tokenizer files copied) whose
`model.safetensors` holds, for each quantized linear weight `W`:
- int4: `W.qweight` uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high one),
  `W.scales` and `W.mins` float32 [N, K/group_size]  (w = q * scale + min);
- int8: `W.qweight` int8 [N, K] and `W.scales` float32 [N]  (w = q * scale);
and every other tensor as it was. `glmserve_quantization.json` names the scheme and the
quantized tensors. Loading rebuilds Int4Weight / Int8Weight exactly, so outputs equal those of
quantizing while loading.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmserve.config import ModelConfig
from glmserve.engine.checkpoint.hf import read_safetensors
from glmserve.engine.layers.linear import Linear, is_output_layer
from glmserve.engine.layers.quant import Int4Weight, Int8Weight
from glmserve.engine.models import model_class

META_FILE = "glmserve_quantization.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".gguf")


@dataclass(frozen=True)
class QuantizedCheckpoint:
    path: Path
    config: ModelConfig
    quantized: dict[str, str]  # tensor name -> "int4" | "int8"
    group_size: int
    quantization: str  # the scheme it was written with
    format: str = "glmserve-quantized"

    def iter_tensors(self, dtype: torch.dtype, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | Int4Weight | Int8Weight]]:
        """Tensors in file order, read into their own memory (not views of a memory map that closes);
        a quantized weight is yielded once all its parts (qweight, scales, mins) have been read."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in read_safetensors(self.path / WEIGHTS_FILE):
            name, _, part = key.rpartition(".")
            scheme = self.quantized.get(name)
            if scheme is None:
                yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor
                continue
            parts = pending.setdefault(name, {})
            parts[part] = tensor
            if len(parts) == (2 if scheme == "int8" else 3):
                yield name, _quantized_weight(pending.pop(name), scheme, self.group_size)
        if pending:
            raise ValueError(f"{self.path / WEIGHTS_FILE}: incomplete quantized tensors {sorted(pending)[:3]}")


def is_quantized_folder(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def open_quantized(path: Path, config: ModelConfig) -> QuantizedCheckpoint:
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != 1:
        raise ValueError(f"{path / META_FILE}: unknown format {meta.get('format')!r}")
    return QuantizedCheckpoint(path, config, dict(meta["tensors"]), int(meta["group_size"]), meta["quantization"])


def _quantized_weight(parts: dict[str, torch.Tensor], scheme: str, group_size: int) -> Int4Weight | Int8Weight:
    packed, scales = parts["qweight"], parts["scales"]
    if scheme == "int8":
        return Int8Weight(packed, scales)
    q = torch.stack([packed & 0x0F, packed >> 4], -1).flatten(-2)  # [N, K/2] -> [N, K]
    return Int4Weight(q, scales, parts["mins"], group_size)


def linear_schemes(config: ModelConfig, quantization: str) -> dict[str, str]:
    """Checkpoint weight name -> scheme, for every tensor that feeds a linear layer.
    The output layer is int8 under both schemes (as when quantizing while loading)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    packed = getattr(model, "packed_modules", {})
    merged_to_leaves: dict[str, list[str]] = {}
    for leaf, (merged, _) in packed.items():
        merged_to_leaves.setdefault(merged, []).append(leaf)
    schemes = {}
    for path, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        scheme = "int8" if is_output_layer(path) else quantization
        prefix, _, leaf = path.rpartition(".")
        for name in merged_to_leaves.get(leaf, [leaf]):
            schemes[f"{prefix}.{name}.weight" if prefix else f"{name}.weight"] = scheme
    return schemes


def write_quantized(checkpoint, output: Path, quantization: str, group_size: int, dtype: torch.dtype) -> int:
    """Quantize `checkpoint` (a Hugging Face folder) into `output`; returns the bytes written."""
    if quantization not in ("int8", "int4"):
        raise ValueError(f"quantization must be int8 or int4; got {quantization!r}")
    if not checkpoint.path.is_dir():
        raise ValueError("glmserve quantize reads Hugging Face folders (a GGUF's 4-bit weights load as they are)")
    schemes = linear_schemes(checkpoint.config, quantization)
    tensors, quantized = {}, {}
    # From `dtype` values, as the loader quantizes them: the two paths give identical weights.
    for name, tensor in checkpoint.iter_tensors(dtype):
        scheme = schemes.get(name)
        if scheme is None or tensor.dim() != 2:
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        quantized[name] = scheme
        tensors.update(_quantized_parts(name, tensor, scheme, group_size))
    output.mkdir(parents=True, exist_ok=True)
    _copy_non_weight_files(checkpoint.path, output)
    save_file(tensors, output / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"format": 1, "quantization": quantization, "group_size": group_size, "tensors": quantized}
    (output / META_FILE).write_text(json.dumps(meta, indent=1))
    return (output / WEIGHTS_FILE).stat().st_size


def _quantized_parts(name: str, tensor: torch.Tensor, scheme: str, group_size: int) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        w = Int8Weight.quantize(tensor)
        return {f"{name}.qweight": w.q, f"{name}.scales": w.scale}
    w = Int4Weight.quantize(tensor, group_size)
    nibbles = w.q.view(w.q.shape[0], -1, 2)
    return {
        f"{name}.qweight": (nibbles[..., 0] | (nibbles[..., 1] << 4)).contiguous(),
        f"{name}.scales": w.scale,
        f"{name}.mins": w.minimum,
    }


def _copy_non_weight_files(source: Path, output: Path) -> None:
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES) and file.name != META_FILE:
            shutil.copy2(file, output / file.name)
