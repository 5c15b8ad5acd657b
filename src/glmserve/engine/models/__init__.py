"""Model registry: ModelConfig.architecture -> model class; building on the meta device and loading
weights tensor by tensor, so peak memory stays near the final model size."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from glmserve.config import ModelConfig
from glmserve.engine.device import release_freed_memory
from glmserve.engine.layers.attention import PagedAttention, alibi_slopes
from glmserve.engine.layers.linear import Linear
from glmserve.engine.layers.quant import QuantWeight
from glmserve.engine.layers.rotary import RotaryEmbedding
from glmserve.engine.models.baichuan import BaichuanForCausalLM
from glmserve.engine.models.glm import ChatGLMForCausalLM, GlmForCausalLM
from glmserve.engine.models.llama import LlamaForCausalLM

# malloc_trim walks the whole heap: give freed pages back once per this many bytes of loaded
# weights (counted as float32), not after every small norm or bias.
TRIM_EVERY_BYTES = 64 * 2**20

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "chatglm": ChatGLMForCausalLM,  # THUDM's ChatGLM2/3 and GLM-4 files
    "glm": GlmForCausalLM,  # the same architecture in transformers' layout
    "baichuan": BaichuanForCausalLM,  # Baichuan-13B, Baichuan2-7B / 13B
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ValueError(
            f"unsupported model architecture {config.architecture!r} (supported: {supported})"
        ) from None


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Allocate the model's parameters uninitialised (they are all loaded next)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    # Cast on the meta device, then allocate: casting allocated weights would write (and so make
    # resident) every page, including those of layers that are quantized and never use them.
    model.to(dtype)
    model.to_empty(device=device)
    for module in model.modules():  # tables computed in __init__ were lost on the meta device
        if isinstance(module, RotaryEmbedding):
            module.build_tables(device)
        if isinstance(module, PagedAttention) and module.alibi is not None:
            module.alibi = alibi_slopes(module.num_heads).to(device)
    return model.eval()


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor | QuantWeight]]) -> None:
    """Copy checkpoint tensors into the model; every parameter must be loaded exactly once.
    Linear layers take their tensors through load_shard (merged projections, quantized weights).
    A quantized embedding that is also the output layer (tied) is offered to the model as such."""
    expected = _expected_keys(model)
    loaded: set[tuple[str, str, int]] = set()
    packed = getattr(model, "packed_modules", {})
    device = next(model.parameters()).device
    untrimmed = 0
    for name, tensor in tensors:
        module_path, param_name, shard = checkpoint_target(name, packed)
        module = _submodule(model, module_path, name)
        if isinstance(module, Linear):
            module.load_shard(param_name, tensor, shard)
        else:
            _copy_param(module, param_name, tensor, name)
            if isinstance(tensor, QuantWeight) and name == getattr(model, "tied_embedding", None):
                model.keep_quantized_output(tensor)
        loaded.add((module_path, param_name, shard))
        untrimmed += 4 * (tensor.q if isinstance(tensor, QuantWeight) else tensor).numel()
        del tensor
        if device.type == "cpu" and untrimmed >= TRIM_EVERY_BYTES:
            release_freed_memory()
            untrimmed = 0
    if device.type == "cpu":
        release_freed_memory()
    missing = sorted(expected - loaded)
    if missing:
        examples = [f"{m}.{p}" + (f" (part {s})" if s else "") for m, p, s in missing[:3]]
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {examples}")


def checkpoint_target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, str, int]:
    """Where a checkpoint tensor goes: (module path, parameter, part of a merged layer), e.g.
    'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn.qkv_proj', 'weight', 0)."""
    module_path, _, param_name = name.rpartition(".")
    prefix, _, leaf = module_path.rpartition(".")
    if leaf in packed:
        merged, shard = packed[leaf]
        return f"{prefix}.{merged}", param_name, shard
    return module_path, param_name, 0


def _submodule(model: nn.Module, module_path: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(module_path)
    except AttributeError:
        raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}") from None


def _copy_param(module: nn.Module, param_name: str, tensor, name: str) -> None:
    if isinstance(tensor, QuantWeight):
        tensor = tensor.dequantize()  # quantized storage only pays off in linear layers
    param = getattr(module, param_name, None)
    if not isinstance(param, torch.Tensor):
        raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
    if param.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
        )
    param.data.copy_(tensor)


def _expected_keys(model: nn.Module) -> set[tuple[str, str, int]]:
    expected = set()
    for module_path, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            shards = len(module.output_sizes) if isinstance(module, Linear) else 1
            expected |= {(module_path, param_name, s) for s in range(shards)}
    return expected
