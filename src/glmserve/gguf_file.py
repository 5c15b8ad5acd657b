"""A GGUF file's header, parsed once per file and shared by the tokenizer and the weight loader.

gguf-py's GGUFReader builds a numpy view for every part of every key/value (~25 µs each), so the
~100k vocabulary and merge strings of a GGUF file took 2.2 s (SmolLM2) to ~7 s (GLM-4's 151k
tokens) before anything else started. This reader walks the same header with `struct` in one
pass (~0.1 s) and keeps gguf-py for what it does well: the type tables and dequantization.

Format (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF",
u32 version (2 or 3), u64 tensor count, u64 key/value count; each key/value is a string key, a
u32 value type and the value (an array: u32 element type, u64 count, the elements); each tensor
info is a string name, u32 dimension count, u64 dimensions (innermost first), u32 ggml type and
a u64 offset from the data section, which starts at the next multiple of general.alignment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Fixed-size scalar value types: their struct format, which numpy reads as the same dtype.
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

# Tensor types gguf-py exposes as typed elements; every other type is raw blocks (uint8 per row).
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: innermost (row length) first
    n_elements: int
    n_bytes: int
    # Memory-mapped, read-only: typed elements in torch order (shape reversed) for F32 / F16 /
    # integer types, else raw blocks, uint8 [..., rows, bytes per row] (as gguf-py's reader).
    data: np.ndarray

    def release_pages(self) -> None:
        """Unmap this tensor's pages from the process (MADV_DONTNEED; they stay in the page cache
        and fault back in if read again): a loader that has copied a tensor calls it, so a file
        being read does not pile up in the process's RSS beside the weights made from it."""
        page = mmap.PAGESIZE
        start = -(-self.data.ctypes.data // page) * page
        end = (self.data.ctypes.data + self.data.nbytes) // page * page
        if end > start and _libc() is not None:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    fields: dict[str, Any]  # metadata as plain Python values (str, int, float, bool, lists)
    tensors: list[GGUFTensor]


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf_file(path: str | Path) -> GGUFFile:
    """The parsed header of a GGUF file (cached per path and modification time)."""
    resolved = Path(path).resolve()
    return _cached(resolved, resolved.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached(path: Path, mtime_ns: int) -> GGUFFile:
    return parse_gguf(path)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    return libc if libc is not None and hasattr(libc, "madvise") else None


def forget_gguf_files() -> None:
    """Drop the cached headers, and with them their memory maps: once a model's weights are read,
    the file's pages would otherwise stay mapped and count in the process's RSS (a 6B Q4_0 file's
    3.4 GB beside the loaded weights)."""
    _cached.cache_clear()


def parse_gguf(path: Path) -> GGUFFile:
    try:
        buffer = np.memmap(path, dtype=np.uint8, mode="r")  # an empty file raises ValueError
        fields, tensor_infos, header_end = _Header(memoryview(buffer), path).parse()
    except (struct.error, ValueError, UnicodeDecodeError, IndexError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-header_end // alignment) * alignment
    tensors = [_tensor(buffer, data_start, *info, path) for info in tensor_infos]
    return GGUFFile(path, fields, tensors)


def _tensor(
    buffer: np.ndarray,
    data_start: int,
    name: str,
    dims: tuple[int, ...],
    raw_type: int,
    offset: int,
    path: Path,
) -> GGUFTensor:
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
    n_elements = int(np.prod(dims, dtype=np.int64))
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_bytes = n_elements * type_size // block_size
    start = data_start + offset
    if start + n_bytes > buffer.size:
        raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
    raw = buffer[start : start + n_bytes]
    torch_shape = tuple(reversed(dims))
    if ggml_type in _ELEMENT_DTYPES:
        data = raw.view(_ELEMENT_DTYPES[ggml_type]).reshape(torch_shape)
    else:
        data = raw.reshape(quant_shape_to_byte_shape(torch_shape, ggml_type))
    return GGUFTensor(name, ggml_type, dims, n_elements, n_bytes, data)


class _Header:
    """A cursor over the header bytes."""

    def __init__(self, view: memoryview, path: Path):
        self.view, self.path, self.pos = view, path, 0

    def parse(self) -> tuple[dict[str, Any], list[tuple], int]:
        if bytes(self.view[:4]) != GGUF_MAGIC:
            raise ValueError("no GGUF magic")
        self.pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            byte_swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if byte_swapped in (2, 3):
                raise ValueError("big-endian GGUF files are not supported")
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        num_tensors, num_fields = self._scalar("<Q"), self._scalar("<Q")
        fields = {}
        for _ in range(num_fields):
            key = self._string()
            fields[key] = self._value(GGUFValueType(self._scalar("<I")))
        tensors = []
        for _ in range(num_tensors):
            name = self._string()
            dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
            tensors.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        return fields, tensors, self.pos

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        size = self._scalar("<Q")
        start, self.pos = self.pos, self.pos + size
        if self.pos > len(self.view):
            raise ValueError("string past the end of the file")
        return str(self.view[start : self.pos], "utf-8")

    def _value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type == GGUFValueType.ARRAY:
            return self._array(GGUFValueType(self._scalar("<I")), self._scalar("<Q"))
        return self._scalar(_SCALARS[value_type])

    def _array(self, item_type: GGUFValueType, count: int) -> list:
        if item_type in _SCALARS:  # one numpy view for the whole array
            dtype = np.dtype(_SCALARS[item_type])
            items = np.frombuffer(self.view, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return items.tolist()
        if item_type == GGUFValueType.STRING:
            return self._strings(count)
        return [self._value(item_type) for _ in range(count)]  # nested arrays

    def _strings(self, count: int) -> list[str]:
        view, pos, out = self.view, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (size,) = unpack(view, pos)
            pos += 8
            out.append(str(view[pos : pos + size], "utf-8"))
            pos += size
        if pos > len(view):
            raise ValueError("string array past the end of the file")
        self.pos = pos
        return out
