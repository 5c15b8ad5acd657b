"""Fine-tuned adapters on disk -> tensors: LoRA in peft's format.

peft's LoRA folder: `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules`,
`use_rslora`, `rank_pattern` / `alpha_pattern`, `bias`) and `adapter_model.safetensors` (or `.bin`)
with, per adapted layer, `base_model.model.<layer path>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r]. The layer's output becomes `W x + scale * B (A x)` with scale = alpha / r (alpha / sqrt(r)
under rsLoRA). Layer paths are the base checkpoint's names (for a Llama `model.layers.0.self_attn.q_proj`,
for ChatGLM `transformer.encoder.layers.0.self_attention.query_key_value`); placing them on the
model's merged layers is engine/lora.py's job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from glmserve.engine.checkpoint.hf import read_bin, read_safetensors
from glmserve.model_path import read_json

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_WEIGHT = re.compile(r"^(?P<path>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")  # optional adapter name


@dataclass
class LoRALayer:
    """One adapted layer: out += B @ (A @ x), B already multiplied by the scale."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scaled

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAWeights:
    path: Path
    layers: dict[str, LoRALayer]  # by the base checkpoint's layer path (no `.weight`)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.a, layer.b))


def is_lora_folder(path: Path) -> bool:
    if not (path / ADAPTER_CONFIG).is_file():
        return False
    return str(read_json(path / ADAPTER_CONFIG).get("peft_type", "")).upper() == "LORA"


def read_lora(path: str | Path, dtype: torch.dtype) -> LoRAWeights:
    """A peft LoRA folder's layers in `dtype`; ValueError naming the problem for anything it cannot serve."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"adapter path {path} is not a folder")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path} has no {ADAPTER_CONFIG}: not a peft adapter")
    config = read_json(path / ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type {peft_type or 'missing'} is not LORA")
    _check_supported(config, path)
    raw = dict(_read_tensors(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        match = LORA_WEIGHT.match(name.removeprefix(PEFT_PREFIX))
        if match is None:
            raise ValueError(f"{path}: tensor {name!r} is not a LoRA A/B weight (embedding or bias adapters are not supported)")
        pairs.setdefault(match["path"], {})[match["which"]] = tensor
    if not pairs:
        raise ValueError(f"{path}: the adapter holds no LoRA weights")
    layers = {}
    for layer_path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: layer {layer_path} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"].float(), pair["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: layer {layer_path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
        scale = _scale(config, layer_path, a.shape[0])
        layers[layer_path] = LoRALayer(a.to(dtype), (b * scale).to(dtype))
    return LoRAWeights(path, layers)


def _check_supported(config: dict, path: Path) -> None:
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {config['bias']!r} is not supported (only 'none')")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save {config['modules_to_save']} (fully trained layers) are not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{path}: fan_in_fan_out (GPT-2 Conv1D layers) is not supported")


def _scale(config: dict, layer_path: str, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # peft: key matches the path's tail
        if re.match(rf"(.*\.)?{pattern}$", layer_path):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_tensors(path: Path):
    if (path / "adapter_model.safetensors").is_file():
        return read_safetensors(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return read_bin(path / "adapter_model.bin")
    raise ValueError(f"{path} has no adapter_model.safetensors or adapter_model.bin")
