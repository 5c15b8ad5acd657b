"""Tiny checkpoints for the loader tests: GGUF files (gguf.GGUFWriter) and Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from loader_reference import llama_cpp_permute
from safetensors.torch import save_file

NUM_LAYERS, HIDDEN, NUM_HEADS, NUM_KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 256, 32
HEAD_DIM = HIDDEN // NUM_HEADS


def tiny_gguf_tensors(with_output: bool = False, with_bias: bool = False) -> dict[str, np.ndarray]:
    """float32 tensors in torch layout and Hugging Face row order, keyed by GGUF name."""
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if with_output:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(NUM_LAYERS):
        shapes |= _block_shapes(f"blk.{i}", with_bias)
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _block_shapes(prefix: str, with_bias: bool) -> dict[str, tuple[int, ...]]:
    q_rows, kv_rows = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    shapes = {
        "attn_norm.weight": (HIDDEN,),
        "attn_q.weight": (q_rows, HIDDEN),
        "attn_k.weight": (kv_rows, HIDDEN),
        "attn_v.weight": (kv_rows, HIDDEN),
        "attn_output.weight": (HIDDEN, q_rows),
        "ffn_norm.weight": (HIDDEN,),
        "ffn_gate.weight": (FFN, HIDDEN),
        "ffn_up.weight": (FFN, HIDDEN),
        "ffn_down.weight": (HIDDEN, FFN),
    }
    if with_bias:
        shapes |= {"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,)}
    return {f"{prefix}.{name}": shape for name, shape in shapes.items()}


def write_gguf(
    path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", qtypes: dict[str, QType] | None = None
) -> None:
    """Write `tensors` the way llama.cpp's converter does: q/k rows permuted for arch llama, then
    quantized to qtypes[name] (default F32). uint8 arrays are taken as raw blocks of that qtype."""
    writer = gguf.GGUFWriter(path, arch)
    _add_metadata(writer)
    for name, weights in tensors.items():
        qtype = (qtypes or {}).get(name, QType.F32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            weights = llama_cpp_permute(weights, NUM_HEADS if ".attn_q." in name else NUM_KV_HEADS)
        data = weights if weights.dtype == np.uint8 else gguf.quants.quantize(weights, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_metadata(writer: gguf.GGUFWriter) -> None:
    writer.add_block_count(NUM_LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def tiny_llama_config(**overrides) -> dict:
    """config.json of a tiny Llama in transformers 5 style (rope_theta inside rope_parameters)."""
    config = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": None,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    return config | overrides


def tiny_llama_state_dict(dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q_rows, kv_rows = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (q_rows, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (kv_rows, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (kv_rows, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, q_rows),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (FFN, HIDDEN),
            f"{p}.mlp.up_proj.weight": (FFN, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}


def write_hf_folder(
    folder: Path,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    layout: str,
    generation_config: dict | None = None,
) -> None:
    """layout: "safetensors" | "sharded_safetensors" | "bin" | "sharded_bin" (two shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    if generation_config is not None:
        _write_json(folder / "generation_config.json", generation_config)
    is_bin = layout.endswith("bin")
    if not layout.startswith("sharded"):
        _save(state_dict, folder / ("pytorch_model.bin" if is_bin else "model.safetensors"), is_bin)
        return
    names = list(state_dict)
    stem, suffix = ("pytorch_model", "bin") if is_bin else ("model", "safetensors")
    shards = {f"{stem}-0000{i + 1}-of-00002.{suffix}": names[i::2] for i in range(2)}
    for file_name, shard_names in shards.items():
        _save({n: state_dict[n] for n in shard_names}, folder / file_name, is_bin)
    weight_map = {n: file_name for file_name, shard_names in shards.items() for n in shard_names}
    _write_json(folder / f"{stem}.{suffix}.index.json", {"metadata": {}, "weight_map": weight_map})


def _save(state_dict: dict[str, torch.Tensor], path: Path, is_bin: bool) -> None:
    if is_bin:
        torch.save(state_dict, path)
    else:
        save_file(state_dict, path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))
