"""Fine-tuned adapters on disk -> tensors: LoRA in peft's format, and ChatGLM's P-Tuning v2 prefixes.

peft's LoRA folder: `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules`,
`use_rslora`, `rank_pattern` / `alpha_pattern`, `bias`) and `adapter_model.safetensors` (or `.bin`)
with, per adapted layer, `base_model.model.<layer path>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r]. The layer's output becomes `W x + scale * B (A x)` with scale = alpha / r (alpha / sqrt(r)
under rsLoRA). Layer paths are the base checkpoint's names (for a Llama `model.layers.0.self_attn.q_proj`,
for ChatGLM `transformer.encoder.layers.0.self_attention.query_key_value`); placing them on the
model's merged layers is engine/lora.py's job.

P-Tuning v2 (ChatGLM2/3's `ptuning/`, ChatGLM3's finetune_demo): a config.json with `pre_seq_len` (and
`prefix_projection`) and weights `transformer.prefix_encoder.embedding.weight` [P, L * 2 * KVH * D] (with
`prefix_projection`, also `trans.0` Linear(L*2*KVH*D -> hidden), tanh, `trans.2` Linear back). THUDM's
`get_prompt` turns its output into per-layer past keys and values: view [P, L * 2, KVH, D], layer i's
keys at 2i and values at 2i + 1, used as they are (no rotary: the prompt's positions start at 0).
Either the whole fine-tuned checkpoint (every request of that model gets the prefix) or the folder
`ptuning/` saves with only the prefix encoder (an adapter on its base model).

peft's PREFIX_TUNING (on transformers' models, e.g. Llama or GLM in transformers' layout): adapter_config.json
with `num_virtual_tokens` and `adapter_model.safetensors` holding `prompt_embeddings` [P, L * 2 * KVH * D],
the prefix encoder's output, in the same order as THUDM's. There the prompt's positions start at P:
transformers counts the prefix as past tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from glmserve.config import ModelConfig
from glmserve.engine.checkpoint.hf import PREFIX_ENCODER, find_weight_files, read_bin, read_safetensors
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


@dataclass
class PrefixKV:
    kv: torch.Tensor  # [layers, 2 (keys, values), P, KVH, D] float32
    position_offset: int  # rotary position of the prompt's first token: 0 (THUDM's code) or P (peft)


def has_ptuning_prefix(path: Path) -> bool:
    """A folder whose config.json sets pre_seq_len: a P-Tuning v2 checkpoint or prefix-encoder folder."""
    config = path / "config.json"
    return path.is_dir() and config.is_file() and bool(read_json(config).get("pre_seq_len"))


def is_prefix_adapter(path: Path) -> bool:
    """A P-Tuning v2 folder or a peft PREFIX_TUNING adapter."""
    if (path / ADAPTER_CONFIG).is_file():
        return str(read_json(path / ADAPTER_CONFIG).get("peft_type", "")).upper() == "PREFIX_TUNING"
    return has_ptuning_prefix(path)


def read_prefix_kv(path: str | Path, config: ModelConfig) -> PrefixKV:
    """The prefix's past keys and values, as THUDM's get_prompt (or peft's) computes them; ValueError
    if the folder's prefix does not fit `config`'s model."""
    path = Path(path).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        return _read_peft_prefix(path, config)
    hf_config = read_json(path / "config.json")
    num_slots, projection = int(hf_config["pre_seq_len"]), bool(hf_config.get("prefix_projection", False))
    if config.architecture != "chatglm":
        raise ValueError(f"{path}: P-Tuning v2 prefixes are served on ChatGLM2/3 (THUDM's layout), not {config.architecture}")
    weight_format, files = find_weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        stream = read_safetensors(file, lambda n: n.startswith(PREFIX_ENCODER)) if weight_format == "safetensors" else read_bin(file)
        tensors.update((n.removeprefix(PREFIX_ENCODER), t.float()) for n, t in stream if n.startswith(PREFIX_ENCODER))
    if "embedding.weight" not in tensors:
        raise ValueError(f"{path}: pre_seq_len is set but the weights hold no {PREFIX_ENCODER}embedding.weight")
    prefix = tensors["embedding.weight"]
    if projection:
        try:
            hidden = torch.tanh(torch.nn.functional.linear(prefix, tensors["trans.0.weight"], tensors["trans.0.bias"]))
            prefix = torch.nn.functional.linear(hidden, tensors["trans.2.weight"], tensors["trans.2.bias"])
        except KeyError as error:
            raise ValueError(f"{path}: prefix_projection is set but {PREFIX_ENCODER}{error.args[0]} is missing") from None
    return PrefixKV(_per_layer(prefix, num_slots, config, path), position_offset=0)


def _read_peft_prefix(path: Path, config: ModelConfig) -> PrefixKV:
    adapter_config = read_json(path / ADAPTER_CONFIG)
    if str(adapter_config.get("peft_type", "")).upper() != "PREFIX_TUNING":
        raise ValueError(f"{path}: not a PREFIX_TUNING adapter")
    if config.architecture == "chatglm":
        raise ValueError(f"{path}: peft prefix tuning runs on transformers' layouts; for THUDM's, use P-Tuning v2 (pre_seq_len)")
    tensors = {name: t.float() for name, t in _read_tensors(path)}
    prefix = tensors.get("prompt_embeddings", tensors.get("prefix_encoder.embedding.weight"))
    if prefix is None:
        raise ValueError(f"{path}: the adapter holds no prompt_embeddings")
    num_slots = int(adapter_config.get("num_virtual_tokens") or prefix.shape[0])
    return PrefixKV(_per_layer(prefix, num_slots, config, path), position_offset=num_slots)


def _per_layer(prefix: torch.Tensor, num_slots: int, config: ModelConfig, path: Path) -> torch.Tensor:
    """[P, L * 2 * KVH * D] -> [L, 2, P, KVH, D]: per virtual token, layer-major, then keys/values."""
    layers, kvh, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    width = layers * 2 * kvh * d
    if tuple(prefix.shape) != (num_slots, width):
        raise ValueError(
            f"{path}: the prefix is {tuple(prefix.shape)}, but this model needs ({num_slots}, {width}) "
            f"= pre_seq_len x {layers} layers x 2 x {kvh} KV heads x {d} (a prefix for another base model?)"
        )
    return prefix.view(num_slots, layers, 2, kvh, d).permute(1, 2, 0, 3, 4).contiguous()
