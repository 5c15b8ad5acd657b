"""Write a random LoRA adapter in peft's format for a model, for tests and benchmarks.

    python -m glmserve.devtools.random_lora --model PATH --out /tmp/adapter [--rank 8] [--targets q_proj,v_proj]

The folder is what `peft`'s `save_pretrained` writes (adapter_config.json + adapter_model.safetensors,
tensors named `base_model.model.<layer>.lora_A.weight` / `lora_B.weight`), with A and B both random
(a trained adapter's B is non-zero; peft initialises it to zero), so the adapter visibly changes
the output. Layer names and shapes come from the model's config: Llama-family names, or ChatGLM's
for THUDM's layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmserve.config import ModelConfig
from glmserve.engine.checkpoint import open_checkpoint

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHATGLM_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def layer_shapes(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Module name -> (path inside a decoder layer, in, out) of the adaptable layers."""
    h, kvh, d, hidden, inter = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                config.hidden_size, config.intermediate_size)  # fmt: skip
    if config.architecture == "chatglm":
        return {
            "query_key_value": ("self_attention.query_key_value", hidden, (h + 2 * kvh) * d),
            "dense": ("self_attention.dense", h * d, hidden),
            "dense_h_to_4h": ("mlp.dense_h_to_4h", hidden, 2 * inter),
            "dense_4h_to_h": ("mlp.dense_4h_to_h", inter, hidden),
        }
    return {
        "q_proj": ("self_attn.q_proj", hidden, h * d),
        "k_proj": ("self_attn.k_proj", hidden, kvh * d),
        "v_proj": ("self_attn.v_proj", hidden, kvh * d),
        "o_proj": ("self_attn.o_proj", h * d, hidden),
        "gate_proj": ("mlp.gate_proj", hidden, inter),
        "up_proj": ("mlp.up_proj", hidden, inter),
        "down_proj": ("mlp.down_proj", inter, hidden),
    }


def write_random_lora(
    model: str | Path, out: str | Path, rank: int = 8, alpha: float = 16, targets: tuple[str, ...] | None = None,
    seed: int = 0, std: float = 0.05,
) -> Path:
    config = open_checkpoint(model).config
    shapes = layer_shapes(config)
    targets = targets or (CHATGLM_TARGETS if config.architecture == "chatglm" else LLAMA_TARGETS)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; this model has {sorted(shapes)}")
    layers_prefix = "transformer.encoder.layers" if config.architecture == "chatglm" else "model.layers"
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config.num_hidden_layers):
        for target in targets:
            path, n_in, n_out = shapes[target]
            name = f"base_model.model.{layers_prefix}.{i}.{path}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * std
            tensors[f"{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * std
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
                      "target_modules": list(targets), "bias": "none", "lora_dropout": 0.0,
                      "base_model_name_or_path": str(model)}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", help="comma-separated module names (default: all adaptable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    targets = tuple(args.targets.split(",")) if args.targets else None
    print(write_random_lora(args.model, args.out, args.rank, args.alpha, targets, args.seed))


if __name__ == "__main__":
    main()
