"""SwiGLU's gate: silu(gate) * up over a merged [gate; up] projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmserve.engine.kernels import native


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2F] -> [T, F]: one fused op on CPU where the native ops are built (same roundings), else two."""
    if gate_up.device.type == "cpu" and native.has_decode_ops():
        return torch.ops.glmserve.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up
