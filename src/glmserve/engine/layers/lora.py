"""Many LoRA adapters on one linear layer, applied to a mixed batch in two GEMMs.

Every resident adapter has a slot. A layer's stacks hold all slots side by side:

    a:  [S * W, in]    slot s's rows [s*W, (s+1)*W): its A matrices (one per merged part, R rows each)
    bt: [S * W, out]   the same rows: its B matrices transposed (scaled), block-diagonal over parts

with W = parts * R (R the largest resident rank; smaller ranks and untargeted parts are zeros).
Rows of different adapters, and of the base, are computed together, with no per-adapter loop:
- few rows (decode; on CPU): the native `lora_add_` gives each row its own slot's x a_s^T bt_s,
  a few microseconds where two small GEMMs cost tens (oneDNN's fixed cost per call);
- many rows (prefill), or no native kernels: h = x a^T for all slots at once ([T, S*W]), the slots
  a row does not use zeroed (`LoRAStep.onehot` [T, S], all zeros for base rows), then out += h bt.
  The extra work is S times one adapter's, small next to the base GEMM while S * W << in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmserve.engine.kernels import native

# Rows up to which the native per-row kernel beats the masked GEMMs (benchmarks/lora.py's model, 2 cores:
# at 16 rows 4 us vs 45 us per layer; GEMMs win from a few hundred rows).
MAX_NATIVE_ROWS = 128


class LoRAStep:
    """Which slot each row of the current step uses; set by the runner before each forward and
    shared by every adapted layer. None: no row uses an adapter (layers skip LoRA)."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # [T] int64, -1 for base rows
        self.onehot: torch.Tensor | None = None  # [T, S] in the compute dtype (the GEMM form)
        self.native = False  # the rows go through torch.ops.glmserve.lora_add_

    def set(self, row_slots: list[int] | None, num_slots: int, device: torch.device, dtype: torch.dtype) -> None:
        """row_slots: per row of the step, its slot or -1 (the base model); None for no adapter rows."""
        if row_slots is None:
            self.row_slots = self.onehot = None
            return
        self.row_slots = torch.tensor(row_slots, dtype=torch.int64, device=device)
        self.native = device.type == "cpu" and len(row_slots) <= MAX_NATIVE_ROWS and native.has_decode_ops()
        self.onehot = None if self.native else F.one_hot(self.row_slots + 1, num_slots + 1)[:, 1:].to(dtype)

    @property
    def active(self) -> bool:
        return self.row_slots is not None


class LoRAStack:
    def __init__(self, step: LoRAStep, in_features: int, output_sizes: list[int], num_slots: int, rank: int, device, dtype):
        self.step = step
        self.output_sizes = list(output_sizes)
        self.num_slots, self.rank = num_slots, rank
        self.width = len(output_sizes) * rank  # W: one slot's columns
        self.a = torch.zeros(num_slots * self.width, in_features, device=device, dtype=dtype)
        self.bt = torch.zeros(num_slots * self.width, sum(output_sizes), device=device, dtype=dtype)

    def clear(self, slot: int) -> None:
        rows = slice(slot * self.width, (slot + 1) * self.width)
        self.a[rows].zero_()
        self.bt[rows].zero_()

    def write(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Adapter weights for merged part `part` (a: [r, in], b: [out_part, r], scaled) into `slot`."""
        r = a.shape[0]
        row = slot * self.width + part * self.rank
        col = sum(self.output_sizes[:part])
        self.a[row : row + r].copy_(a)
        self.bt[row : row + r, col : col + b.shape[0]].copy_(b.t())

    def add_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [T, out] += the adapters of x's rows [T, in]; out is the base layer's fresh output."""
        step = self.step
        if step.row_slots is None:
            return out
        if step.native:
            torch.ops.glmserve.lora_add_(out, x, self.a, self.bt, step.row_slots, self.width)
            return out
        h = F.linear(x, self.a)  # [T, S*W]
        h = (h.view(-1, self.num_slots, self.width) * step.onehot[:, :, None]).view(h.shape)
        return out.addmm_(h, self.bt)
