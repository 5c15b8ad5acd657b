"""The random-checkpoint tool writes the real on-disk layouts that the loader (and transformers) read."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glmserve.devtools.glm_layout import chatglm_tensor_shapes, rotary_inv_freq
from glmserve.devtools.random_checkpoint import load_config, main, scale_config
from glmserve.devtools.shard_writer import plan_shards

SIZES = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96"]


def write(out: Path, *args: str) -> Path:
    main(["--config", "chatglm3-6b", "--out", str(out), *SIZES, "--dtype", "float32", *args])
    return out


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    for file in sorted(folder.glob("*.bin")):
        tensors |= torch.load(file, weights_only=True, mmap=True)
    return tensors


def test_bin_shards_and_index(tmp_path):
    out = write(tmp_path, "--format", "bin", "--shards", "3")
    names = [
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
    ]
    assert sorted(p.name for p in out.glob("*.bin")) == names
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    config = json.loads((out / "config.json").read_text())
    shapes = chatglm_tensor_shapes(config)
    assert index["weight_map"].keys() == shapes.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_all(out).values())
    for file in names:  # each shard loads on its own, safely
        state_dict = torch.load(out / file, weights_only=True, mmap=True)
        assert all(index["weight_map"][name] == file for name in state_dict)
        assert all(tuple(t.shape) == shapes[name] for name, t in state_dict.items())
    tensors = read_all(out)
    assert torch.equal(tensors["transformer.rotary_pos_emb.inv_freq"], rotary_inv_freq(config))
    assert config["model_type"] == "chatglm" and config["num_layers"] == 2 and config["kv_channels"] == 16
    assert config["torch_dtype"] == "float32"
    assert {"tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}


def test_same_seed_same_weights_in_every_format(tmp_path):
    bin_tensors = read_all(write(tmp_path / "bin", "--format", "bin", "--shards", "2"))
    st_tensors = read_all(write(tmp_path / "st", "--format", "safetensors", "--shards", "4"))
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    assert bin_tensors.keys() == st_tensors.keys()
    assert all(torch.equal(bin_tensors[n], st_tensors[n]) for n in bin_tensors)
    other_seed = read_all(write(tmp_path / "seed1", "--seed", "1"))
    assert not torch.equal(
        other_seed["transformer.output_layer.weight"], st_tensors["transformer.output_layer.weight"]
    )


def test_glm_layout_splits_qkv(tmp_path):
    ours = read_all(write(tmp_path / "chatglm"))
    theirs = read_all(write(tmp_path / "glm", "--layout", "glm", "--shards", "2"))
    config = json.loads((tmp_path / "glm" / "config.json").read_text())
    assert config["model_type"] == "glm" and config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    qkv = ours["transformer.encoder.layers.1.self_attention.query_key_value.weight"]  # [(4 + 2 + 2) * 16, 64]
    assert torch.equal(theirs["model.layers.1.self_attn.q_proj.weight"], qkv[:64])
    assert torch.equal(theirs["model.layers.1.self_attn.k_proj.weight"], qkv[64:96])
    assert torch.equal(theirs["model.layers.1.self_attn.v_proj.weight"], qkv[96:])
    gate_up = ours["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    assert torch.equal(theirs["model.layers.0.mlp.gate_up_proj.weight"], gate_up)
    assert not any("inv_freq" in name for name in theirs)


def test_bfloat16_and_single_file(tmp_path):
    out = write(tmp_path, "--dtype", "bfloat16")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert {t.dtype for t in read_all(out).values()} == {torch.bfloat16}


def test_plan_shards_balances_bytes_and_keeps_order():
    sizes = {f"t{i}": size for i, size in enumerate([10, 1, 1, 10, 1, 1, 10, 1])}
    shards = plan_shards(sizes, 3)
    assert [n for shard in shards for n in shard] == list(sizes)
    assert len(shards) == 3 and all(shards)
    assert max(sum(sizes[n] for n in s) for s in shards) <= 14
    assert len(plan_shards(sizes, 20)) == len(sizes)  # never an empty shard


def test_scale_config_keeps_the_architecture_consistent():
    config, _ = load_config("glm4-9b")
    small = scale_config(config, num_layers=3, hidden_size=128, num_attention_heads=8)
    assert small["kv_channels"] == 16 and small["num_hidden_layers"] == 3 and small["rope_ratio"] == 500
    assert config["num_layers"] == 40  # the loaded config is not changed
    with pytest.raises(ValueError, match="multiple"):
        scale_config(config, num_attention_heads=3)
