"""Hugging Face checkpoint folders (config.json + safetensors or .bin shards) -> ModelConfig + tensors.

Shards are opened one at a time and tensors read one at a time, so peak memory stays near one
model in the target dtype: safetensors tensors are read into their own buffers (no memory map, whose
touched pages would count as resident until the whole shard is done), `.bin` shards through
`torch.load(mmap=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmserve.config import ModelConfig
from glmserve.model_path import read_json

PREFIX_ENCODER = "transformer.prefix_encoder."  # ChatGLM2/3's P-Tuning v2 weights

# model_type values served by the Llama model (engine/models/llama.py).
LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2"})

# ModelConfig field -> config.json keys, first present wins: Hugging Face names, then ChatGLM's.
CONFIG_KEYS = {
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "num_hidden_layers": ("num_hidden_layers", "num_layers"),
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads", "multi_query_group_num", "num_attention_heads"),
    "head_dim": ("head_dim", "kv_channels"),
    "rms_norm_eps": ("rms_norm_eps", "layernorm_epsilon"),
    "max_position_embeddings": ("max_position_embeddings", "seq_length", "model_max_length"),
}
OPTIONAL_FIELDS = frozenset({"head_dim", "rms_norm_eps", "max_position_embeddings"})

# Embedding and output layer names: Llama / Baichuan, ChatGLM.
VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "word_embeddings.weight", "output_layer.weight")

# (format, single file, shard index), in order of preference.
WEIGHT_LAYOUTS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


@dataclass(frozen=True)
class HFCheckpoint:
    path: Path
    config: ModelConfig
    format: str  # "safetensors" | "bin"
    weight_files: tuple[Path, ...]
    quantization: str | None = None  # float weights (see engine/checkpoint, Checkpoint)
    group_size: int | None = None

    def iter_tensors(self, dtype: torch.dtype, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor), float tensors in `dtype`, one shard and one tensor at a time.
        (`keep_quantized` concerns GGUF blocks; these checkpoints hold float tensors.)"""
        for name, tensor in self._read_all():
            if not self._is_skipped(name):
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _read_all(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.format == "bin":
            for file in self.weight_files:
                yield from read_bin(file)
            return
        # The vocabulary-sized tensors (embedding, output layer: the biggest, never merged) go first,
        # while little is resident, so their transient copies (the read tensor, its quantized form)
        # do not add to the peak at the end of loading.
        for file in self.weight_files:
            yield from read_safetensors(file, lambda name: name.endswith(VOCAB_TENSOR_SUFFIXES))
        for file in self.weight_files:
            yield from read_safetensors(file, lambda name: not name.endswith(VOCAB_TENSOR_SUFFIXES))

    def _is_skipped(self, name: str) -> bool:
        # Old Llama checkpoints saved the RoPE inv_freq buffer (derived from config); some tied
        # checkpoints still save lm_head, a copy of the embedding.
        if self.config.architecture == "chatglm":  # THUDM's files save the derived RoPE buffer too
            # A P-Tuning v2 checkpoint's prefix encoder is read apart (checkpoint/adapters.py).
            return name.endswith("rotary_pos_emb.inv_freq") or name.startswith(PREFIX_ENCODER)
        if self.config.architecture != "llama":
            return False
        is_tied_head = self.config.tie_word_embeddings and name == "lm_head.weight"
        return is_tied_head or name.endswith("rotary_emb.inv_freq")


def open_hf_folder(folder: Path) -> HFCheckpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder")
    config = hf_model_config(read_json(config_file), read_json(folder / "generation_config.json"))
    weight_format, weight_files = find_weight_files(folder)
    return HFCheckpoint(folder, config, weight_format, weight_files)


def hf_model_config(config: dict[str, Any], generation_config: dict[str, Any]) -> ModelConfig:
    """Llama-like model types map to architecture "llama"; any other keeps its model_type and
    carries the whole config.json in `extra` for its family's model to read."""
    model_type = config.get("model_type")
    if not model_type:
        raise ValueError("config.json has no model_type")
    if model_type == "chatglm":
        _check_chatglm_variant(config)
    values = _config_values(config, model_type)
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    is_llama = model_type in LLAMA_TYPES
    fields = dict(
        architecture="llama" if is_llama else model_type,
        **values,
        rope_theta=_rope_theta(config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        bos_token_id=_first(generation_config, "bos_token_id", default=config.get("bos_token_id")),
        eos_token_ids=_eos_token_ids(config, generation_config),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        generation_config=generation_config,
        extra=_llama_extra(config) if is_llama else dict(config),
    )
    if model_type == "chatglm":
        fields |= _chatglm_fields(config)
    if model_type == "baichuan":
        fields["extra"] |= _baichuan_extra(config)
    return ModelConfig(**fields)


BAICHUAN2_VOCAB_SIZE = 125696  # Baichuan2's tokenizer; Baichuan-13B's has 64000 pieces


def _baichuan_extra(config: dict[str, Any]) -> dict[str, Any]:
    """All three releases say `BaichuanForCausalLM`. The vocabulary tells Baichuan2 (NormHead)
    from Baichuan-13B, and only Baichuan2-7B's config has max_position_embeddings (RoPE; the
    13B models use ALiBi). Hidden sizes are not used, so scaled-down checkpoints keep their kind."""
    return {
        "norm_head": config["vocab_size"] == BAICHUAN2_VOCAB_SIZE,
        "position_embedding": "rope" if "max_position_embeddings" in config else "alibi",
    }


# THUDM ChatGLMConfig flags selecting variants glm.py does not implement, with the value that
# every ChatGLM2/3 and GLM-4 release has (and the default when absent).
CHATGLM_REQUIRED_FLAGS = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
}


def _check_chatglm_variant(config: dict[str, Any]) -> None:
    if "padded_vocab_size" not in config:
        raise ValueError(
            "config.json (model_type 'chatglm') has no padded_vocab_size: the first-generation "
            "ChatGLM-6B is not supported (ChatGLM2-6B, ChatGLM3-6B and GLM-4 are)"
        )
    wrong = {
        key: config[key] for key, value in CHATGLM_REQUIRED_FLAGS.items() if config.get(key, value) != value
    }
    if wrong:
        raise ValueError(
            f"unsupported ChatGLM variant: config.json has {wrong}, expected {CHATGLM_REQUIRED_FLAGS}"
        )


def _chatglm_fields(config: dict[str, Any]) -> dict[str, Any]:
    """THUDM's config.json (ChatGLM2/3, GLM-4): the embedding has padded_vocab_size rows, KV heads
    are multi_query_group_num unless multi_query_attention is false, add_qkv_bias puts a bias on
    q/k/v, and the RoPE base is 10000 * rope_ratio (the 32k/128k variants raise rope_ratio)."""
    fields = {
        "vocab_size": config["padded_vocab_size"],
        "attention_bias": bool(config.get("add_qkv_bias", False)),
        "rope_theta": 10000.0 * float(config.get("rope_ratio", 1.0)),
    }
    if config.get("multi_query_attention") is False:  # every release says true; THUDM's default is false
        fields["num_key_value_heads"] = config["num_attention_heads"]
    return fields


def _config_values(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    values = {name: _first(config, *keys) for name, keys in CONFIG_KEYS.items()}
    missing = [name for name, value in values.items() if value is None and name not in OPTIONAL_FIELDS]
    if missing:
        looked_for = "; ".join(f"{name}: {' / '.join(CONFIG_KEYS[name])}" for name in missing)
        raise ValueError(f"config.json (model_type {model_type!r}) lacks {looked_for}")
    return {name: value for name, value in values.items() if value is not None}


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    # `"head_dim": null` occurs in real configs; treat null as absent.
    return next((config[k] for k in keys if config.get(k) is not None), default)


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers >= 5 writes rope_theta inside rope_parameters.
    rope_parameters = config.get("rope_parameters") or {}
    return float(_first(config, "rope_theta", default=rope_parameters.get("rope_theta", 10000.0)))


def _eos_token_ids(config: dict[str, Any], generation_config: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (generation_config, config):
        eos = source.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return tuple(dict.fromkeys(ids))


def _llama_extra(config: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {"model_type": config["model_type"]}
    rope_parameters = config.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        extra["rope_scaling"] = rope_parameters
    elif config.get("rope_scaling"):
        extra["rope_scaling"] = config["rope_scaling"]
    return extra


def find_weight_files(folder: Path) -> tuple[str, tuple[Path, ...]]:
    """(format, files): an index's shards in name order, else the single file; safetensors first."""
    for weight_format, single_name, index_name in WEIGHT_LAYOUTS:
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name)["weight_map"]
            files = tuple(folder / name for name in sorted(set(weight_map.values())))
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{folder}: shards listed in {index_name} are missing: {', '.join(missing)}")
            return weight_format, files
        if (folder / single_name).is_file():
            return weight_format, (folder / single_name,)
    expected = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout[1:])
    raise ValueError(f"{folder} has no weights; expected one of {expected}")


# safetensors dtype names (https://github.com/huggingface/safetensors, format spec) -> torch.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_safetensors(file: Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors (those `wanted`, default all) in file order, each read into a fresh tensor with plain reads.

    The format: an 8-byte little-endian header length, a JSON header mapping names to
    {dtype, shape, data_offsets [begin, end)} relative to the end of the header, then the data.
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if wanted is not None and not wanted(name):
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{file.name}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            if tensor.nbytes != end - begin:
                raise ValueError(
                    f"{file.name}: tensor {name!r} has {end - begin} bytes, its shape needs {tensor.nbytes}"
                )
            f.seek(base + begin)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                raise ValueError(f"{file.name} is truncated (tensor {name!r})")
            yield name, tensor


def read_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # mmap: storages stay in the file's page cache until a tensor is converted or copied.
    state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    for name in list(state_dict):
        yield name, state_dict.pop(name)

