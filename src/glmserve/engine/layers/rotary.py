"""Rotary position embedding (Su et al., RoFormer, 2021).

Two layouts of the rotated pairs within a head's first `rotary_dim` dimensions:
- "neox" (Llama, Hugging Face): pairs are (i, i + rotary_dim/2), "rotate_half";
- "interleaved" (ChatGLM2/3, GLM-4, GPT-J): pairs are adjacent (2i, 2i + 1).
Both are computed as x * cos + swap(x) * sin_signed, where swap exchanges each pair's
members and sin_signed carries the minus sign of the first member: 3 kernels per call, or one
in-place op on CPU where the native ops are built (`apply_`, the same roundings).
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.engine.kernels import native


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, base: float, max_position: int, style: str = "neox"):
        super().__init__()
        if style not in ("neox", "interleaved"):
            raise ValueError(f"unknown rotary style {style!r}")
        self.head_dim, self.rotary_dim, self.style = head_dim, rotary_dim, style
        self.base, self.max_position = base, max_position
        self.build_tables(None)

    def build_tables(self, device: torch.device | None) -> None:
        rot = self.rotary_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, rot, 2, dtype=torch.float64, device=device) / rot))
        positions = torch.arange(self.max_position, dtype=torch.float64, device=device)
        angles = torch.outer(positions, inv_freq)  # [P, rot/2]
        cos, sin = angles.cos(), angles.sin()
        if self.style == "neox":  # [c0..c_{h-1}, c0..c_{h-1}], sin signed [-s, +s]
            cos_full, sin_full = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
        else:  # [c0, c0, c1, c1, ...], sin signed [-s0, +s0, -s1, +s1, ...]
            cos_full = cos.repeat_interleave(2, -1)
            sin_full = torch.stack([-sin, sin], -1).flatten(-2)
        self.register_buffer("cos_cache", cos_full.float(), persistent=False)  # [P, rot]
        self.register_buffer("sin_cache", sin_full.float(), persistent=False)  # [P, rot]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step tables, computed once and shared by all layers: two [T, 1, rot] tensors."""
        return (
            self.cos_cache[positions].to(dtype).unsqueeze(1),
            self.sin_cache[positions].to(dtype).unsqueeze(1),
        )

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "neox":
            return x.roll(self.rotary_dim // 2, -1)
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, num_heads, head_dim] -> rotated copy; dims past rotary_dim pass through."""
        if self.rotary_dim == self.head_dim:
            return torch.addcmul(x * cos, self._swap(x), sin)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([torch.addcmul(rot * cos, self._swap(rot), sin), rest], -1)

    def apply_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`apply`, rotating x in place where a fused op can (x: a fresh projection's [T, NH, D] view)."""
        if x.device.type == "cpu" and native.has_decode_ops() and x.stride(-1) == 1 and cos.dtype == x.dtype:
            torch.ops.glmserve.rotary_(x, cos.contiguous(), sin.contiguous(), self.style == "interleaved")
            return x
        return self.apply(x, cos, sin)
