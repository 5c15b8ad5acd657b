"""Model registry: ModelConfig.architecture -> model class; building on the meta device and loading
weights tensor by tensor, so peak memory stays near the final model size."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from glmserve.config import ModelConfig
from glmserve.engine.layers.rotary import RotaryEmbedding
from glmserve.engine.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ValueError(f"unsupported model architecture {config.architecture!r} (supported: {supported})") from None


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Allocate the model's parameters uninitialised (they are all loaded next)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    model.to_empty(device=device)
    model.to(dtype)
    for module in model.modules():  # tables computed in __init__ were lost on the meta device
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
    return model.eval()


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model; every parameter must be loaded exactly once."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for name, tensor in tensors:
        target = _packed_target(name, packed)
        if target is not None:
            module_path, shard, param_name = target
            model.get_submodule(module_path).load_shard(param_name, tensor, shard)
            loaded.add(f"{module_path}.{param_name}#{shard}")
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(params[name].shape)}")
        params[name].data.copy_(tensor)
        loaded.add(name)
    _check_all_loaded(model, params, packed, loaded)


def _packed_target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int, str] | None:
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn.qkv_proj', 0, 'weight')."""
    module_path, _, param_name = name.rpartition(".")
    prefix, _, leaf = module_path.rpartition(".")
    if leaf not in packed:
        return None
    merged, shard = packed[leaf]
    return f"{prefix}.{merged}", shard, param_name


def _check_all_loaded(model, params, packed, loaded: set[str]) -> None:
    shards_per_merged: dict[str, int] = {}
    for merged, shard in packed.values():
        shards_per_merged[merged] = max(shards_per_merged.get(merged, 0), shard + 1)
    missing = []
    for name in params:
        module_path, _, param_name = name.rpartition(".")
        leaf = module_path.rpartition(".")[2]
        if leaf in shards_per_merged:
            need = {f"{module_path}.{param_name}#{s}" for s in range(shards_per_merged[leaf])}
            if not need <= loaded:
                missing.append(name)
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
