"""Device facts: dtype choice, physical cores, free memory; and the Placement the engine resolves
from them once and hands down (layers receive decisions, they do not make them)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from glmserve.config import EngineConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where and how the engine runs, resolved once when it starts: the device, the compute dtype,
    and the memory free before the weights load (what memory decisions are made against)."""

    device: torch.device
    dtype: torch.dtype
    free_memory_bytes: int

    @classmethod
    def resolve(cls, config: EngineConfig) -> Placement:
        device = torch.device(config.device)
        return cls(device, resolve_dtype(config.dtype, device), available_memory_bytes(device))

    def keeps_dense_copy(self, dense_weight_bytes: int) -> bool:
        """Whether 4-bit layers also keep a dense copy for many-row steps: only when all dense
        weights take under a quarter of free memory (a small model); big models stay 4-bit only."""
        return dense_weight_bytes < self.free_memory_bytes / 4


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 GEMMs run natively (else they are emulated, slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def num_physical_cores() -> int:
    """Physical cores usable by this process (hyper-threads share a core's FPUs)."""
    try:
        usable = os.sched_getaffinity(0)
        text = Path("/proc/cpuinfo").read_text()
    except (OSError, AttributeError):
        return os.cpu_count() or 1
    cores, processor, physical_id = set(), None, "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            processor = int(value)
        elif key == "physical id":
            physical_id = value
        elif key == "core id" and processor in usable:
            cores.add((physical_id, value))
    return max(1, len(cores) or len(usable))


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim).

    Loading frees many mid-sized temporaries between weights that stay; glibc keeps the holes
    resident for reuse, so without this the resident size while loading drifts hundreds of MiB
    above the model's. A no-op where malloc_trim does not exist (musl, macOS)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
