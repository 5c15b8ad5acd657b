"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in float32 for 16-bit inputs.

On CPU, torch's rms_norm is composite (cast, pow, mean, add, rsqrt, mul, cast, mul), while
layer_norm has one fused kernel. Over [x, -x] the mean is 0 and the variance is mean(x^2), so the
first half of layer_norm([x, -x]) with the weight repeated is exactly rms_norm(x): about half the
time even with the concatenation (docs/engine.md), the same float32 accumulation and one rounding
to the output dtype. Where the native CPU ops are built (kernels/native.py), one fused op does it
instead, and `add_and_norm` also folds in the residual addition before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.kernels import native


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self._doubled: tuple[int, torch.Tensor] | None = None  # (weight's data_ptr, [weight, weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused on CUDA
        k = x.shape[-1]
        if native.has_decode_ops() and x.dtype == self.weight.dtype:
            return torch.ops.glmserve.rms_norm(x.reshape(-1, k), self.weight, self.eps).view(x.shape)
        return F.layer_norm(torch.cat([x, -x], -1), (2 * k,), self._doubled_weight(), None, self.eps)[..., :k]

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): a residual connection and the norm after it, x and delta [T, K]."""
        if x.device.type == "cpu" and native.has_decode_ops() and x.dtype == delta.dtype == self.weight.dtype:
            return torch.ops.glmserve.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)

    def _doubled_weight(self) -> torch.Tensor:
        ptr = self.weight.data_ptr()  # weights load once, after construction: rebuild if they moved
        if self._doubled is None or self._doubled[0] != ptr:
            self._doubled = (ptr, torch.cat([self.weight, self.weight]))
        return self._doubled[1]
