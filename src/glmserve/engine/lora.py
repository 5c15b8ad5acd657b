"""LoRA adapters of one base model: registered by name, resident in up to `max_loras` slots (LRU),
placed on the model's merged layers.

A registered adapter is known by name and folder (checked against the model when registered, so a
mismatch is refused then, in one line). The resident ones hold slots in every adapted layer's stacks
(layers/lora.py); an adapter a step needs and that is not resident is read again from its folder into
a free slot, or the slot of the least recently used adapter that step does not need. The scheduler
keeps the adapters of running sequences within `max_loras`, so a step always fits.

Placing: an adapter names the base checkpoint's layers. Where the model merges several checkpoint
layers into one (Llama's q/k/v into qkv_proj, gate/up into gate_up_proj), each becomes a part of the
merged layer's stacks (its A rows side by side, its B block-diagonal), found the way the loader finds
the place of a checkpoint tensor (`packed_modules`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glmserve.engine.checkpoint.adapters import LoRALayer, LoRAWeights, read_lora
from glmserve.engine.device import release_freed_memory
from glmserve.engine.layers.linear import Linear, is_output_layer
from glmserve.engine.layers.lora import LoRAStack, LoRAStep
from glmserve.engine.models import checkpoint_target


class UnknownAdapterError(LookupError):
    """A request named an adapter that is not registered."""


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    id: int  # unique per registration: salts the prefix cache (a re-registered name computes afresh)
    rank: int
    num_bytes: int
    targets: frozenset[str]  # module paths of the model's layers it adapts
    kind: str = "lora"  # or "prefix": a P-Tuning v2 prefix (held by the engine, not here)


Placed = dict[str, list[tuple[int, LoRALayer]]]  # module path -> (merged part, weights)


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, device: torch.device, dtype: torch.dtype):
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1; got {max_loras}")
        self.model, self.max_loras, self.device, self.dtype = model, max_loras, device, dtype
        self.step = LoRAStep()
        self.registered: dict[str, Adapter] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.num_slots = self.rank = 0  # the stacks' shape
        self.stacks: dict[str, LoRAStack] = {}  # by module path
        self.num_loads = 0  # adapters read into a slot (registration and on demand)
        self.version = 0  # bumped when the stacks are reallocated (whoever holds them must look again)
        self._ids = itertools.count(1)

    # -- registry -----------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> Adapter:
        """Register (and, while a slot is free, load) an adapter under a new name (LLMEngine.add_lora
        checks it against prefix adapters too); ValueError naming any mismatch."""
        weights = read_lora(path, self.dtype)
        placed = self._place(weights)
        adapter = Adapter(name, weights.path, self.next_id(), weights.rank, weights.num_bytes, frozenset(placed))
        self.registered[name] = adapter
        self._fit()
        if len(self.resident) < self.num_slots:
            self._load(adapter, self._free_slot(set()), placed)
        if self.device.type == "cpu":
            release_freed_memory()  # the file's read buffers and float32 copies
        return adapter

    def next_id(self) -> int:
        """A fresh adapter id (LoRA or prefix): what salts the prefix cache."""
        return next(self._ids)

    def remove(self, name: str) -> None:
        adapter = self.registered.pop(name, None)
        if adapter is None:
            raise UnknownAdapterError(name)
        slot = self.resident.pop(name, None)
        if slot is not None:
            for stack in self.stacks.values():
                stack.clear(slot)

    def get(self, name: str) -> Adapter:
        try:
            return self.registered[name]
        except KeyError:
            raise UnknownAdapterError(name) from None

    # -- a step -------------------------------------------------------------------------------
    def set_step(self, row_adapters: list[str | None]) -> None:
        """Make the adapters of a step's rows resident and tell the layers each row's slot
        (row_adapters: per row of the step, its adapter's name or None for the base model)."""
        needed = {name for name in row_adapters if name is not None}
        if not needed:
            self.step.set(None, 0, self.device, self.dtype)
            return
        for name in needed:
            if name in self.resident:
                self.resident.move_to_end(name)
            else:
                self._load(self.registered[name], self._free_slot(needed))
        slots = [self.resident[name] if name is not None else -1 for name in row_adapters]
        self.step.set(slots, self.num_slots, self.device, self.dtype)

    # -- internals ----------------------------------------------------------------------------
    def _place(self, weights: LoRAWeights) -> Placed:
        packed = getattr(self.model, "packed_modules", {})
        placed: Placed = {}
        for layer_path, layer in weights.layers.items():
            module_path, _, part = checkpoint_target(f"{layer_path}.weight", packed)
            try:
                module = self.model.get_submodule(module_path)
            except AttributeError:
                raise ValueError(
                    f"{weights.path}: targets {layer_path}, which this model does not have (an adapter for another architecture?)"
                ) from None
            if not isinstance(module, Linear) or is_output_layer(module_path):
                raise ValueError(
                    f"{weights.path}: targets {layer_path}; LoRA is served on the decoder's linear layers only"
                )
            rows, cols = module.output_sizes[part], module.in_features
            if tuple(layer.b.shape[:1]) + tuple(layer.a.shape[1:]) != (rows, cols):
                raise ValueError(
                    f"{weights.path}: {layer_path} maps {layer.a.shape[1]} -> {layer.b.shape[0]} features in the "
                    f"adapter but {cols} -> {rows} in the model (an adapter for another base model?)"
                )
            placed.setdefault(module_path, []).append((part, layer))
        return placed

    def _fit(self) -> None:
        """Grow the stacks to the registered adapters (slots, largest rank, layers any adapts);
        a new shape starts empty and the resident adapters are read again into it."""
        num_slots = min(self.max_loras, len(self.registered))
        rank = max((a.rank for a in self.registered.values()), default=0)
        targets = set().union(*(a.targets for a in self.registered.values()))
        if num_slots <= self.num_slots and rank <= self.rank and targets <= set(self.stacks):
            return
        num_slots, rank = max(num_slots, self.num_slots), max(rank, self.rank)
        resident = [name for name in self.resident if name in self.registered]
        for stack_path in self.stacks:
            self.model.get_submodule(stack_path).lora = None
        self.stacks = {}  # the old ones are freed before the new ones are allocated
        for path in sorted(targets):
            linear = self.model.get_submodule(path)
            linear.lora = self.stacks[path] = LoRAStack(
                self.step, linear.in_features, linear.output_sizes, num_slots, rank, self.device, self.dtype
            )
        self.num_slots, self.rank = num_slots, rank
        self.version += 1
        self.resident.clear()
        for slot, name in enumerate(resident):
            self._load(self.registered[name], slot)

    def _free_slot(self, needed: set[str]) -> int:
        used = set(self.resident.values())
        free = [slot for slot in range(self.num_slots) if slot not in used]
        if free:
            return free[0]
        for name, slot in self.resident.items():  # least recently used first
            if name not in needed:
                del self.resident[name]
                return slot
        raise RuntimeError(f"a step needs more than {self.num_slots} adapters at once (max_loras)")

    def _load(self, adapter: Adapter, slot: int, placed: Placed | None = None) -> None:
        if placed is None:
            placed = self._place(read_lora(adapter.path, self.dtype))
        for stack in self.stacks.values():
            stack.clear(slot)
        for path, parts in placed.items():
            for part, layer in parts:
                self.stacks[path].write(slot, part, layer.a.to(self.device), layer.b.to(self.device))
        self.resident[adapter.name] = slot
        self.num_loads += 1
