"""Write a random-weight ChatGLM2/3 / GLM-4 / Baichuan checkpoint in the real on-disk layout, with the real tokenizer.

    python -m glmserve.devtools.random_checkpoint --config chatglm3-6b --out /tmp/chatglm3-tiny \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --multi-query-group-num 2 \\
        --kv-channels 16 --ffn-hidden-size 96 --rope-ratio 3 --format bin --shards 3 --dtype float32

--config is a config.json path (tokenizer files are taken from its folder) or a preset naming the
real configs shipped in glmserve/devtools/presets: chatglm2-6b, chatglm3-6b, glm4-9b, baichuan-13b,
baichuan2-7b, baichuan2-13b (Baichuan: the size flags map onto its keys, see baichuan_layout.py). Without
overrides the full 6B / 9B shape is written, one tensor in memory at a time for safetensors.
--layout glm writes the same weights in transformers' GlmForCausalLM layout (model_type glm).
Weights depend only on --seed and each tensor's name: every format, shard count and layout of
one seed holds the same model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmserve.devtools import PRESETS_DIR
from glmserve.devtools.baichuan_layout import (
    baichuan_tensor_shapes,
    is_baichuan_config,
    scale_baichuan_config,
)
from glmserve.devtools.glm_layout import chatglm_tensor_shapes, glm_config, rotary_inv_freq, to_glm_layout
from glmserve.devtools.shard_writer import plan_shards, write_sharded

# preset -> folders under PRESETS_DIR: the config's first, then where tokenizer files are found
# (ChatGLM2-6B ships the same tokenizer.model as ChatGLM3-6B, kept once).
PRESETS = {
    "chatglm2-6b": ("chatglm2", "chatglm3"),
    "chatglm3-6b": ("chatglm3",),
    "glm4-9b": ("glm4",),
    "baichuan-13b": ("baichuan13b",),
    "baichuan2-7b": ("baichuan2-7b",),
    "baichuan2-13b": ("baichuan2-13b", "baichuan2-7b"),  # Baichuan2-13B ships the 7B tokenizer.model
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
SIZE_KEYS = (  # config.json keys that --num-layers etc. override
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "multi_query_group_num",
    "kv_channels",
    "padded_vocab_size",
    "rope_ratio",
    "seq_length",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CheckpointSpec:
    config: dict[str, Any]  # THUDM config.json (model_type chatglm)
    out: Path
    format: str = "safetensors"  # safetensors | bin
    num_shards: int = 1
    seed: int = 0
    dtype: torch.dtype = torch.bfloat16
    std: float = 0.02  # of the random matrices; norms are 1 + N(0, 0.1)
    layout: str = "chatglm"  # chatglm | glm
    tokenizer_dirs: tuple[Path, ...] = ()


def load_config(name_or_path: str) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """(config.json, folders holding its tokenizer files) for a preset name or a config path."""
    if name_or_path in PRESETS:
        dirs = tuple(PRESETS_DIR / d for d in PRESETS[name_or_path])
        path = dirs[0] / "config.json"
    else:
        path = Path(name_or_path).expanduser()
        dirs = (path.parent,)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path} (presets: {', '.join(PRESETS)})")
    return json.loads(path.read_text(encoding="utf-8")), dirs


def scale_config(config: dict[str, Any], **sizes: Any) -> dict[str, Any]:
    """A copy with the given SIZE_KEYS replaced (None: keep); kv_channels follows hidden_size /
    heads unless given, and num_hidden_layers follows num_layers where the config has both."""
    unknown = set(sizes) - set(SIZE_KEYS)
    if unknown:
        raise ValueError(f"unknown size keys {sorted(unknown)}")
    if is_baichuan_config(config):
        return scale_baichuan_config(config, sizes)
    given = {k: v for k, v in sizes.items() if v is not None}
    out = {**config, **given}
    if ("hidden_size" in given or "num_attention_heads" in given) and "kv_channels" not in given:
        out["kv_channels"] = out["hidden_size"] // out["num_attention_heads"]
    if "num_hidden_layers" in config:
        out["num_hidden_layers"] = out["num_layers"]
    if out.get("multi_query_attention") and out["num_attention_heads"] % out["multi_query_group_num"]:
        raise ValueError("num_attention_heads must be a multiple of multi_query_group_num")
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """float32, a function of (seed, name) only."""
    if name.endswith("rotary_pos_emb.inv_freq"):
        raise ValueError("the RoPE buffer is computed, not random")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.empty(shape, dtype=torch.float32).normal_(0.0, 1.0, generator=generator)
    if "layernorm" in name or name.endswith("norm.weight"):  # RMSNorm gains near 1, but not 1, so a mis-loaded norm shows
        return values.mul_(0.1).add_(1.0)
    return values.mul_(std)


def write_random_checkpoint(spec: CheckpointSpec) -> list[Path]:
    """config.json, tokenizer files and weight shards in `spec.out`; returns the files written."""
    spec.out.mkdir(parents=True, exist_ok=True)
    if is_baichuan_config(spec.config) and spec.layout != "chatglm":
        raise ValueError("Baichuan checkpoints have one layout (--layout is for ChatGLM)")
    shapes = (baichuan_tensor_shapes if is_baichuan_config(spec.config) else chatglm_tensor_shapes)(spec.config)
    outputs = {name: _output_layout(name, shape, spec) for name, shape in shapes.items()}
    sizes = {name: sum(_numel(s) for _, s in entries) for name, entries in outputs.items()}
    shards = plan_shards({n: s for n, s in sizes.items() if s}, spec.num_shards)

    def make(name: str) -> list[tuple[str, torch.Tensor]]:
        if name.endswith("rotary_pos_emb.inv_freq"):
            tensor = rotary_inv_freq(spec.config)
        else:
            tensor = random_tensor(name, shapes[name], spec.seed, spec.std)
        tensor = tensor.to(spec.dtype)
        return to_glm_layout(name, tensor, spec.config) if spec.layout == "glm" else [(name, tensor)]

    files = write_sharded(spec.out, spec.format, shards, outputs, spec.dtype, make)
    return [_write_config(spec), *_copy_tokenizer_files(spec), *files]


def _output_layout(name: str, shape: tuple[int, ...], spec: CheckpointSpec) -> list[tuple[str, tuple]]:
    if spec.layout == "chatglm":
        return [(name, shape)]
    meta = torch.empty(shape, device="meta")  # shapes only: split sizes without data
    return [(n, tuple(t.shape)) for n, t in to_glm_layout(name, meta, spec.config)]


def _write_config(spec: CheckpointSpec) -> Path:
    dtype_name = str(spec.dtype).removeprefix("torch.")
    config = (
        glm_config(spec.config, dtype_name)
        if spec.layout == "glm"
        else {**spec.config, "torch_dtype": dtype_name}
    )
    path = spec.out / "config.json"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _copy_tokenizer_files(spec: CheckpointSpec) -> list[Path]:
    copied = []
    for file_name in TOKENIZER_FILES:
        source = next((d / file_name for d in spec.tokenizer_dirs if (d / file_name).is_file()), None)
        if source is not None:
            copied.append(Path(shutil.copyfile(source, spec.out / file_name)))
    return copied


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m glmserve.devtools.random_checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help=f"config.json path or preset: {', '.join(PRESETS)}")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    for key in SIZE_KEYS:
        parser.add_argument("--" + key.replace("_", "-"), type=float if key == "rope_ratio" else int)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--shards", type=int, default=1, help="number of weight files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: the config's torch_dtype")
    parser.add_argument("--std", type=float, default=0.02, help="std of the random weight matrices")
    parser.add_argument("--layout", choices=["chatglm", "glm"], default="chatglm")
    parser.add_argument("--tokenizer-dir", type=Path, help="take tokenizer files from here instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config, tokenizer_dirs = load_config(args.config)
    config = scale_config(config, **{key: getattr(args, key) for key in SIZE_KEYS})
    spec = CheckpointSpec(
        config=config,
        out=args.out,
        format=args.format,
        num_shards=args.shards,
        seed=args.seed,
        dtype=DTYPES[args.dtype or config.get("torch_dtype") or "bfloat16"],
        std=args.std,
        layout=args.layout,
        tokenizer_dirs=(args.tokenizer_dir,) if args.tokenizer_dir else tokenizer_dirs,
    )
    files = write_random_checkpoint(spec)
    total_gb = sum(f.stat().st_size for f in files) / 2**30
    print(f"wrote {len(files)} files ({total_gb:.2f} GiB) to {args.out}")


if __name__ == "__main__":
    main()
