"""Linear layers whose weights come from one or several checkpoint tensors.

`MergedLinear` holds several projections of the same input as one matrix (q/k/v, gate/up),
so a step runs one GEMM instead of several; `load_shard` copies a checkpoint tensor into
its rows. Weight-only quantization happens here, shard by shard as tensors load: a weight that
arrives quantized (a GGUF's 4-bit or Q8_0 blocks) or is quantized on arrival (`quantization`) is
stored, once all its shards are in, in the form `quant.select_kernel` picks for the device and
dtype, and the float weight, never written, is dropped. Dense CPU bf16 weights are prepacked for
oneDNN once they are complete (PREPACK_BF16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.layers.lora import LoRAStack
from glmserve.engine.layers.quant import Int4Weight, Int8Weight, QuantWeight
from glmserve.engine.layers.quant_kernels import Kernel, kernel_for

# PyTorch's CPU int4/int8 kernels are weight-bound GEMVs: they beat bf16 GEMM for a few rows
# (decode of 1-4 sequences) and lose by 16 rows, where bf16 reuses each weight across rows; CUDA's
# tinygemm likewise grows about linearly with rows. So a layer that also holds its dense weight uses
# it for bigger steps (figures: docs/engine.md, "Kernels per step size"). The native kernels say
# their own limit (`max_rows`).
MAX_INT4_ROWS = 4


def max_fused_rows(packed) -> int:
    """Rows up to which a quantized form beats a dense copy of the weight."""
    return getattr(packed, "max_rows", MAX_INT4_ROWS)

# oneDNN reorders a plain bf16 weight into its blocked layout on every F.linear call; reordered once
# at load (`_reorder_linear_weight`, as inductor's weight prepacking does), the same GEMM is
# faster, most for few rows, with identical results (docs/engine.md).
PREPACK_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepacks(device: torch.device, dtype: torch.dtype) -> bool:
    """Do dense weights of this device and dtype go into oneDNN's layout (for the memory estimate too)?"""
    return PREPACK_BF16 and device.type == "cpu" and dtype == torch.bfloat16


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """[N, K] weight in oneDNN's layout for `prepacked_linear`, or None where it does not apply."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.data, 1) if prepacks(weight.device, weight.dtype) else None


def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


OUTPUT_LAYER_NAMES = ("lm_head", "output_layer")  # Llama / Baichuan, ChatGLM


def is_output_layer(module_path: str) -> bool:
    return module_path.rpartition(".")[2] in OUTPUT_LAYER_NAMES


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = [out_features]
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed = None  # the quantized weight in the form its kernel reads (quant_kernels.Kernel)
        self.prepacked: torch.Tensor | None = None  # CPU bf16: the dense weight in oneDNN's layout
        # Set by the loader before weights arrive:
        self.quantization: str | None = None  # "int8" | "int4": quantize float weights as they load
        self.group_size = 64  # int4 group size for quantize-on-load
        self.keep_dense_copy = False  # also keep the float weight for many-row steps (small models)
        self.int8_activations = True  # EngineConfig.activation_precision == "int8"
        self._pending: dict[int, torch.Tensor | QuantWeight] = {}  # weight shards not yet stored
        self.lora: LoRAStack | None = None  # resident LoRA adapters of this layer (engine/lora.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        return out if self.lora is None else self.lora.add_(x, out)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        has_dense = self.weight is not None or self.prepacked is not None
        if self.packed is not None and (not has_dense or x.shape[0] <= max_fused_rows(self.packed)):
            out = self.packed.matmul(x)
            return out if self.bias is None else out + self.bias
        if self.prepacked is not None:
            return prepacked_linear(x, self.prepacked, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _prepack(self) -> None:
        """Move a loaded dense CPU bf16 weight into oneDNN's layout (see PREPACK_BF16)."""
        self.prepacked = prepack(self.weight)
        if self.prepacked is not None:
            self.weight = None

    def load_shard(self, param_name: str, tensor: torch.Tensor | QuantWeight, shard: int = 0) -> None:
        """Take one checkpoint tensor for rows `shard` of the weight (or bias). Weight shards are
        held until all of a merged layer's have arrived: their kinds decide how it is stored."""
        size = self.output_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} has {tensor.shape[0]} rows, expected {size}")
        if param_name != "weight":
            start = sum(self.output_sizes[:shard])
            getattr(self, param_name).data[start : start + size].copy_(tensor)
            return
        self._pending[shard] = tensor
        if len(self._pending) == len(self.output_sizes):
            parts = [self._pending.pop(i) for i in range(len(self.output_sizes))]
            self._store_weight(parts)

    def _store_weight(self, parts: list[torch.Tensor | QuantWeight]) -> None:
        merged = self._merge_quantized(parts)
        if merged is None:
            start = 0
            for part in parts:
                self.weight.data[start : start + part.shape[0]].copy_(_dense(part))
                start += part.shape[0]
            self._prepack()
            return
        merged = merged.to(self.weight.device)
        kernel: Kernel | None = kernel_for(merged, self.weight.device, self.weight.dtype, self.int8_activations)
        if kernel is None:  # Q8_0 blocks where no kernel reads them
            self.weight.data.copy_(merged.dequantize())
            self._prepack()
            return
        if self.keep_dense_copy:
            self.weight.data.copy_(merged.dequantize())
            if kernel.is_fused:  # for few-row steps; dequantizing per call never beats the dense copy
                self.packed = kernel.from_weight(merged, self.weight.dtype)
            self._prepack()
            return
        self.packed = kernel.from_weight(merged, self.weight.dtype)
        self.weight = None  # never written: its pages were never touched

    def _merge_quantized(self, parts: list[torch.Tensor | QuantWeight]) -> QuantWeight | None:
        """The whole weight in one quantized form, or None to store it dense.

        With `quantization`, float parts are quantized here; a part that came 4-bit from the file
        is kept exactly and sets the group size of the others. Without it, parts that all came in
        the same 4-bit (or 8-bit, or Q8_0) form stay so; float parts, or a mix (a GGUF Q4_K_M file
        has Q4_K and Q6_K rows in one q/k/v), are stored dense.
        """
        device = self.weight.device
        if self.quantization == "int8":
            return Int8Weight.concat(
                [p if isinstance(p, Int8Weight) else Int8Weight.quantize(_dense(p).to(device)) for p in parts]
            )
        if self.quantization == "int4":
            group = next((p.group_size for p in parts if isinstance(p, Int4Weight)), self.group_size)
            return Int4Weight.concat([
                p if isinstance(p, Int4Weight) and p.group_size == group
                else Int4Weight.quantize(_dense(p).to(device), group)
                for p in parts
            ])  # fmt: skip
        kinds = {(type(p), getattr(p, "group_size", None)) for p in parts}
        if len(kinds) == 1 and isinstance(parts[0], QuantWeight):
            return type(parts[0]).concat(parts)
        return None


def _dense(weight: torch.Tensor | QuantWeight) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QuantWeight) else weight


class MergedLinear(Linear):
    """Output rows are the concatenation of `output_sizes` projections, in order."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes
