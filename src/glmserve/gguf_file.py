"""One parsed GGUFReader per file, shared by the tokenizer and the weight loader.

Parsing a GGUF header (its ~100k vocabulary and merge strings) takes ~2 s in gguf-py; the
reader memory-maps the tensors, so keeping it costs no RAM beyond the parsed metadata.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf


def open_gguf_reader(path: str | Path) -> gguf.GGUFReader:
    resolved = Path(path).resolve()
    return _cached_reader(resolved, resolved.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: Path, mtime_ns: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)
