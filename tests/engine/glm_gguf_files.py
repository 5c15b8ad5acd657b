"""chatglm GGUF files for the tests: glmserve.devtools.chatglm_gguf writes them as llama.cpp's
converter does; here, the float32 folder holding the exact values such a file stores.

    write_chatglm_gguf(tmp_path / "q8.gguf", folder, QType.Q8_0)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file

from glmserve.devtools.chatglm_gguf import read_tensors, write_chatglm_gguf

__all__ = ["write_chatglm_gguf", "write_roundtrip_folder"]


def write_roundtrip_folder(folder: Path, out: Path, qtype: QType) -> Path:
    """A copy of a THUDM folder whose 2-D weights went through `qtype` and back to float32: the
    exact values a GGUF of that type holds, so its model must give the same logits."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {}
    for name, weights in read_tensors(folder):
        if weights.ndim == 2 and qtype == QType.F16:
            weights = weights.astype(np.float16)
        elif weights.ndim == 2 and qtype != QType.F32:
            weights = gguf.quants.dequantize(gguf.quants.quantize(weights, qtype), qtype)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    save_file(tensors, out / "model.safetensors")
    return out
