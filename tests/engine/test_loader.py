from __future__ import annotations

import functools
import json
import types

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from loader_files import (
    FFN,
    HEAD_DIM,
    HIDDEN,
    NUM_HEADS,
    NUM_KV_HEADS,
    NUM_LAYERS,
    VOCAB,
    tiny_gguf_tensors,
    tiny_llama_config,
    tiny_llama_state_dict,
    write_gguf,
    write_hf_folder,
)
from loader_reference import dequantize_q4_0, dequantize_q4_1, dequantize_q8_0

from glmserve.config import ModelConfig
from glmserve.engine.checkpoint import open_checkpoint, read_gguf_metadata


def layer_names(num_layers: int) -> set[str]:
    parts = [
        "input_layernorm", "post_attention_layernorm",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]  # fmt: skip
    return {f"model.layers.{i}.{part}.weight" for i in range(num_layers) for part in parts}


TIED_LLAMA_NAMES = layer_names(NUM_LAYERS) | {"model.embed_tokens.weight", "model.norm.weight"}


def load_float32(path) -> dict[str, torch.Tensor]:
    return dict(open_checkpoint(path).iter_tensors(torch.float32))


# --- GGUF, tiny files --------------------------------------------------------------------------


def test_gguf_config_from_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_gguf_tensors())
    ckpt = open_checkpoint(path)
    assert (ckpt.format, ckpt.path) == ("gguf", path)
    assert ckpt.config.extra == {"model_type": "llama"}
    assert ckpt.config == ModelConfig(
        architecture="llama",
        vocab_size=VOCAB,  # from the token list: no llama.vocab_size
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,  # no rope.dimension_count / key_length: hidden // heads
        rms_norm_eps=float(np.float32(1e-5)),  # GGUF stores float32
        rope_theta=500000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # no output.weight
        bos_token_id=1,
        eos_token_ids=(2,),
    )


def test_gguf_names_are_hf_llama_names(tmp_path):
    write_gguf(tmp_path / "tied.gguf", tiny_gguf_tensors())
    write_gguf(tmp_path / "untied.gguf", tiny_gguf_tensors(with_output=True))
    assert set(load_float32(tmp_path / "tied.gguf")) == TIED_LLAMA_NAMES
    untied = open_checkpoint(tmp_path / "untied.gguf")
    assert not untied.config.tie_word_embeddings
    assert {name for name, _ in untied.iter_tensors(torch.float32)} == TIED_LLAMA_NAMES | {"lm_head.weight"}


def test_gguf_iter_tensors_is_lazy(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", tiny_gguf_tensors())
    assert isinstance(
        open_checkpoint(tmp_path / "tiny.gguf").iter_tensors(torch.float32), types.GeneratorType
    )


def test_gguf_undoes_llama_cpp_permutation_of_q_and_k(tmp_path):
    source = tiny_gguf_tensors()
    write_gguf(tmp_path / "tiny.gguf", source)  # permutes q/k rows the llama.cpp way
    loaded = load_float32(tmp_path / "tiny.gguf")
    for i in range(NUM_LAYERS):
        for gguf_part, hf_part in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")]:
            expected = torch.from_numpy(source[f"blk.{i}.{gguf_part}.weight"])
            assert torch.equal(loaded[f"model.layers.{i}.self_attn.{hf_part}.weight"], expected)


def test_gguf_qwen2_keeps_rows_and_biases(tmp_path):
    source = tiny_gguf_tensors(with_bias=True)
    write_gguf(tmp_path / "qwen2.gguf", source, arch="qwen2")  # llama.cpp does not permute qwen2
    ckpt = open_checkpoint(tmp_path / "qwen2.gguf")
    assert ckpt.config.architecture == "llama" and ckpt.config.attention_bias
    assert ckpt.config.extra == {"model_type": "qwen2"}
    loaded = dict(ckpt.iter_tensors(torch.float32))
    for part in ["q_proj", "k_proj", "v_proj"]:
        gguf_part = "attn_" + part[0]
        assert torch.equal(
            loaded[f"model.layers.0.self_attn.{part}.weight"],
            torch.from_numpy(source[f"blk.0.{gguf_part}.weight"]),
        )
        assert torch.equal(
            loaded[f"model.layers.0.self_attn.{part}.bias"],
            torch.from_numpy(source[f"blk.0.{gguf_part}.bias"]),
        )


@pytest.mark.parametrize(
    ("qtype", "reference", "max_error"),
    [
        # Max error vs the float source, per block: half a step; Q4_0's step is max|w| / 8.
        (QType.Q8_0, dequantize_q8_0, lambda w: np.abs(w).max() / 127 * 0.51),
        (QType.Q4_0, dequantize_q4_0, lambda w: np.abs(w).max() / 8 * 1.01),
        (QType.Q4_1, dequantize_q4_1, lambda w: (w.max() - w.min()) / 15 * 0.51),
    ],
)
def test_gguf_dequantizes_block_formats_like_the_spec(tmp_path, qtype, reference, max_error):
    source = tiny_gguf_tensors()
    names = ["token_embd.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_down.weight"]
    write_gguf(tmp_path / "q.gguf", source, qtypes=dict.fromkeys(names, qtype))
    loaded = load_float32(tmp_path / "q.gguf")
    hf_names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    for name, hf_name in zip(names, hf_names, strict=True):
        weights = source[name]
        raw = gguf.quants.quantize(weights, qtype).tobytes()
        np.testing.assert_array_equal(loaded[hf_name].numpy(), reference(raw, weights.shape))
        # A transposed or misordered layout would be far off the float source.
        rows = weights.reshape(-1, 32)
        errors = np.abs(loaded[hf_name].numpy().reshape(-1, 32) - rows).max(axis=1)
        assert all(errors <= [max_error(block) + 1e-3 for block in rows])


@pytest.mark.parametrize(("qtype", "d_offsets"), [(QType.Q4_K, (0, 2)), (QType.Q6_K, (208,))])
def test_gguf_dequantizes_k_quants(tmp_path, qtype, d_offsets):
    # gguf cannot quantize K formats; write random blocks with sane f16 super-block scales.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    num_blocks = HIDDEN * FFN // block_size
    blocks = np.random.default_rng(1).integers(0, 256, (num_blocks, type_size), dtype=np.uint8)
    for offset in d_offsets:
        blocks[:, offset : offset + 2] = np.full((len(blocks), 1), 0.01, np.float16).view(np.uint8)
    # ffn_down is [HIDDEN, FFN]; FFN is a multiple of the 256-weight super-block.
    raw = {"blk.0.ffn_down.weight": blocks.reshape(HIDDEN, -1)}
    write_gguf(tmp_path / "k.gguf", tiny_gguf_tensors() | raw, qtypes=dict.fromkeys(raw, qtype))
    loaded = load_float32(tmp_path / "k.gguf")["model.layers.0.mlp.down_proj.weight"]
    assert loaded.shape == (HIDDEN, FFN)
    np.testing.assert_array_equal(loaded.numpy(), gguf.quants.dequantize(raw["blk.0.ffn_down.weight"], qtype))


def test_gguf_f16_bf16_and_target_dtype(tmp_path):
    source = tiny_gguf_tensors()
    qtypes = {"blk.0.ffn_up.weight": QType.F16, "blk.0.ffn_gate.weight": QType.BF16}
    write_gguf(tmp_path / "f.gguf", source, qtypes=qtypes)
    loaded = dict(open_checkpoint(tmp_path / "f.gguf").iter_tensors(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    up = torch.from_numpy(source["blk.0.ffn_up.weight"].astype(np.float16)).to(torch.bfloat16)
    gate = torch.from_numpy(source["blk.0.ffn_gate.weight"]).to(torch.bfloat16)  # both round to nearest even
    assert torch.equal(loaded["model.layers.0.mlp.up_proj.weight"], up)
    assert torch.equal(loaded["model.layers.0.mlp.gate_proj.weight"], gate)


def test_read_gguf_metadata_gives_plain_values(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", tiny_gguf_tensors())
    metadata = read_gguf_metadata(tmp_path / "tiny.gguf")
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == NUM_LAYERS
    assert metadata["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(VOCAB)]
    assert metadata["tokenizer.ggml.eos_token_id"] == 2
    assert not any(key.startswith("GGUF.") for key in metadata)


def test_gguf_errors(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", tiny_gguf_tensors(), arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        open_checkpoint(tmp_path / "gpt2.gguf")
    write_gguf(tmp_path / "rope.gguf", tiny_gguf_tensors() | {"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'rope_freqs.weight'"):
        open_checkpoint(tmp_path / "rope.gguf")
    int_norm = {"output_norm.weight": np.ones(HIDDEN, np.uint8)}  # raw I8 data
    write_gguf(tmp_path / "int.gguf", tiny_gguf_tensors() | int_norm, qtypes={"output_norm.weight": QType.I8})
    with pytest.raises(ValueError, match="has type I8, not supported"):
        open_checkpoint(tmp_path / "int.gguf")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="unsupported model file"):
        open_checkpoint(tmp_path / "notes.gguf")
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "missing.gguf")


# --- GGUF, the bundled SmolLM2-135M-Instruct ------------------------------------------------------


@pytest.fixture(scope="module")
def bundled(bundled_gguf):
    return open_checkpoint(bundled_gguf)


def test_bundled_config(bundled):
    assert bundled.config == ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=float(np.float32(1e-5)),
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    )


def test_bundled_matches_transformers_gguf_loader(bundled, bundled_gguf, monkeypatch):
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) needs accelerate; this is the loader it calls. The meta model
    # only gives it the names to map to. It rebuilds gguf's name map once per submodule (~6 s): cache it.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_hidden_layers=30, tie_word_embeddings=True)
        )
    expected = load_gguf_checkpoint(bundled_gguf, return_tensors=True, model_to_load=model)["tensors"]
    names = set()
    for name, tensor in bundled.iter_tensors(torch.float32):
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
        names.add(name)
    assert names == layer_names(30) | {"model.embed_tokens.weight", "model.norm.weight"} == set(expected)


# --- Hugging Face folders --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "bin", "sharded_bin"])
def test_hf_folder_round_trip(tmp_path, layout):
    state_dict = tiny_llama_state_dict(torch.bfloat16)
    write_hf_folder(
        tmp_path, tiny_llama_config(), state_dict, layout, generation_config={"eos_token_id": [2, 7]}
    )
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == layout.removeprefix("sharded_") and ckpt.path == tmp_path
    loaded = dict(ckpt.iter_tensors(torch.float32))
    assert loaded.keys() == state_dict.keys() == TIED_LLAMA_NAMES | {"lm_head.weight"}
    for name, tensor in state_dict.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor.float())


def test_hf_llama_config(tmp_path):
    generation_config = {"eos_token_id": [2, 7]}
    write_hf_folder(tmp_path, tiny_llama_config(), tiny_llama_state_dict(), "safetensors", generation_config)
    config = open_checkpoint(tmp_path).config
    assert config.extra == {"model_type": "llama"}
    assert config == ModelConfig(
        architecture="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,  # "head_dim": null
        rms_norm_eps=1e-5,
        rope_theta=500000.0,  # from rope_parameters
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_ids=(2, 7),  # generation_config's, then config's
        torch_dtype="bfloat16",
    )


def test_hf_qwen2_and_mistral_configs(tmp_path):
    qwen2 = tiny_llama_config(
        model_type="qwen2",
        rope_theta=1e6,
        head_dim=32,
        rope_parameters=None,
        dtype=None,
        torch_dtype="float16",
    )
    write_hf_folder(tmp_path / "qwen2", qwen2, tiny_llama_state_dict(), "safetensors")
    config = open_checkpoint(tmp_path / "qwen2").config
    assert config.architecture == "llama" and config.attention_bias
    assert (config.rope_theta, config.head_dim, config.torch_dtype) == (1e6, 32, "float16")
    scaling = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}
    write_hf_folder(
        tmp_path / "mistral",
        tiny_llama_config(model_type="mistral", rope_parameters=scaling),
        tiny_llama_state_dict(),
        "safetensors",
    )
    config = open_checkpoint(tmp_path / "mistral").config
    assert config.architecture == "llama"
    assert config.extra == {"model_type": "mistral", "rope_scaling": scaling}


def test_hf_tied_llama_skips_lm_head_and_inv_freq(tmp_path):
    state_dict = tiny_llama_state_dict() | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    write_hf_folder(tmp_path, tiny_llama_config(tie_word_embeddings=True), state_dict, "bin")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config.tie_word_embeddings
    assert {name for name, _ in ckpt.iter_tensors(torch.float32)} == TIED_LLAMA_NAMES


def test_hf_other_model_type_keeps_whole_config(tmp_path):
    glm = {
        "model_type": "chatglm", "padded_vocab_size": 64, "hidden_size": 32, "ffn_hidden_size": 96, "num_layers": 2,
        "num_attention_heads": 4, "multi_query_group_num": 2, "kv_channels": 8, "layernorm_epsilon": 1e-5,
        "seq_length": 128, "eos_token_id": 2, "torch_dtype": "float16",
    }  # fmt: skip
    state_dict = {
        "transformer.rotary_pos_emb.inv_freq": torch.ones(4),
        "transformer.embedding.word_embeddings.weight": torch.ones(64, 32, dtype=torch.float16),
    }
    write_hf_folder(tmp_path, glm, state_dict, "bin")
    ckpt = open_checkpoint(tmp_path)
    config = ckpt.config
    assert config.architecture == "chatglm" and config.extra == glm
    assert (config.vocab_size, config.intermediate_size, config.num_hidden_layers) == (64, 96, 2)
    assert (config.num_key_value_heads, config.head_dim, config.max_position_embeddings) == (2, 8, 128)
    loaded = dict(ckpt.iter_tensors(torch.bfloat16))
    assert loaded.keys() == state_dict.keys() - {"transformer.rotary_pos_emb.inv_freq"}  # derived buffer: skipped
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())


def test_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        open_checkpoint(tmp_path)
    write_hf_folder(
        tmp_path / "gpt2", {"model_type": "gpt2", "n_embd": 8, "vocab_size": 16}, {}, "safetensors"
    )
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*hidden_size: hidden_size"):
        open_checkpoint(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="lacks"):
        open_checkpoint(tmp_path / "empty")
    write_hf_folder(tmp_path / "shards", tiny_llama_config(), tiny_llama_state_dict(), "sharded_safetensors")
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing: model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path / "shards")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(tiny_llama_config()))
    with pytest.raises(ValueError, match="has no weights; expected one of model.safetensors"):
        open_checkpoint(tmp_path / "noweights")


def test_read_safetensors_equals_the_library(tmp_path):
    """Our plain-read safetensors reader (no memory map) against safetensors' own, every dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from glmserve.engine.checkpoint.hf import read_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "b.bf16": torch.randn(3, 5, generator=generator).bfloat16(),
        "a.f32": torch.randn(7, generator=generator),
        "c.f16": torch.randn(2, 2, 2, generator=generator).half(),
        "d.i64": torch.arange(5),
        "e.u8": torch.arange(9, dtype=torch.uint8).view(3, 3),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(1.5),
        "h.empty": torch.empty(0, 4),
    }
    file = tmp_path / "x.safetensors"
    save_file(tensors, file, metadata={"format": "pt"})
    ours = dict(read_safetensors(file))
    with safe_open(file, framework="pt") as f:
        assert sorted(ours) == sorted(f.keys())
        for name in f.keys():
            assert ours[name].dtype == f.get_tensor(name).dtype
            assert torch.equal(ours[name], f.get_tensor(name))

    file.write_bytes(file.read_bytes()[:-4])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        list(read_safetensors(file))
