"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in float32 for 16-bit inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's kernel accumulates in float32 for bf16/fp16 inputs.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
