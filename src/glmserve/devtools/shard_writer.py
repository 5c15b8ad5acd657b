"""Writing sharded checkpoints in Hugging Face's on-disk layouts, one tensor at a time.

    model-00001-of-00003.safetensors ... + model.safetensors.index.json
    pytorch_model-00001-of-00003.bin ... + pytorch_model.bin.index.json
    (one shard: model.safetensors / pytorch_model.bin, no index)

safetensors shards are streamed: the header (names, dtypes, shapes, byte offsets) is known from
the shapes alone, so each tensor is made, written and dropped before the next — a 9B model is
written with one tensor in memory. `torch.save` needs a whole state dict, so a .bin shard is
held in memory while it is written (use more shards to bound that).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

MakeTensors = Callable[[str], list[tuple[str, torch.Tensor]]]  # source name -> output tensors
Layout = dict[str, list[tuple[str, tuple[int, ...]]]]  # source name -> output (name, shape) list
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FILE_NAMES = {  # format -> (shard name pattern, single file, index)
    "safetensors": (
        "model-{:05d}-of-{:05d}.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
    ),
    "bin": ("pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
}


def plan_shards(sizes: dict[str, int], num_shards: int) -> list[list[str]]:
    """Split names (in order) into `num_shards` runs of about equal bytes; tensors are never cut."""
    num_shards = max(1, min(num_shards, len(sizes)))
    target = sum(sizes.values()) / num_shards
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        names_left = len(sizes) - sum(map(len, shards))
        must_start = num_shards - len(shards) >= names_left  # every remaining shard needs a tensor
        if (
            shards[-1]
            and len(shards) < num_shards
            and (filled + size / 2 > target * len(shards) or must_start)
        ):
            shards.append([])
        shards[-1].append(name)
        filled += size
    return shards


def write_sharded(
    out: Path, fmt: str, shards: list[list[str]], outputs: Layout, dtype: torch.dtype, make: MakeTensors
) -> list[Path]:
    """Write every shard (and the index when there are several); returns the files written.
    `shards` hold source names; `outputs[source]` lists the (name, shape) that `make(source)` returns."""
    pattern, single, index_name = FILE_NAMES[fmt]
    names = [pattern.format(i + 1, len(shards)) for i in range(len(shards))] if len(shards) > 1 else [single]
    write = _write_safetensors if fmt == "safetensors" else _write_bin
    weight_map: dict[str, str] = {}
    for file_name, sources in zip(names, shards, strict=True):
        layout = [entry for source in sources for entry in outputs[source]]
        write(out / file_name, sources, layout, dtype, make)
        weight_map |= {name: file_name for name, _ in layout}
    if len(shards) == 1:
        return [out / names[0]]
    total_bytes = sum(_numel(shape) for entries in outputs.values() for _, shape in entries) * dtype.itemsize
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in names] + [out / index_name]


def _write_safetensors(path: Path, sources: list[str], layout, dtype: torch.dtype, make: MakeTensors) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        size = _numel(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
    expected = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for source in sources:
            for name, tensor in make(source):
                if (name, tuple(tensor.shape)) != next(expected) or tensor.dtype != dtype:
                    raise RuntimeError(f"{name}: made tensor does not match the planned header")
                f.write(tensor.contiguous().view(torch.uint8).numpy().data)  # raw little-endian bytes


def _write_bin(path: Path, sources: list[str], layout, dtype: torch.dtype, make: MakeTensors) -> None:
    # clone: a split view would otherwise save its whole parent storage
    state_dict = {name: tensor.clone() for source in sources for name, tensor in make(source)}
    torch.save(state_dict, path)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
