"""Raw 4-bit GGUF blocks (Q4_0, Q4_1, Q4_K) as Int4Weight and Q8_0 blocks as Int8BlockWeight,
without rounding anything.

Block layouts (ggml-common.h): each row is a run of blocks; within a block of 32 weights the
16 bytes of `qs` hold weight i in the low nibble of byte i and weight i + 16 in the high one.
- Q4_0 (18 B / 32): fp16 d, qs            -> w = d * (q - 8)
- Q4_1 (20 B / 32): fp16 d, fp16 m, qs    -> w = d * q + m
- Q4_K (144 B / 256): fp16 d, fp16 dmin, 12 B of 6-bit (sc, m) for 8 sub-blocks, 128 B qs where
  each 32-byte chunk c holds sub-block 2c in its low nibbles and 2c + 1 in its high ones
                                           -> w = d * sc_j * q - dmin * m_j
- Q8_0 (34 B / 32): fp16 d, 32 int8 qs     -> w = d * q
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from glmserve.engine.layers.quant import Int4Weight, Int8BlockWeight
from glmserve.gguf_file import GGUFTensor

INT4_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q4_K)
KEPT_TYPES = (*INT4_TYPES, QType.Q8_0)  # read as they are stored by read_quantized
GROUP_SIZE = 32


def _halves(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] nibbles: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fp16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _q4_0(blocks: np.ndarray):
    d = _fp16(blocks[:, 0:2])
    return _halves(blocks[:, 2:18]), d, -8 * d


def _q4_1(blocks: np.ndarray):
    return _halves(blocks[:, 4:20]), _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])


def _q4_k(blocks: np.ndarray):
    n = blocks.shape[0]
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [n, 8] each
    chunks = blocks[:, 16:144].reshape(n, 4, 32)
    q = np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(n * 8, 32)  # sub-blocks in order
    scale = (d * sc.astype(np.float32)).reshape(n * 8, 1)
    minimum = -(dmin * m.astype(np.float32)).reshape(n * 8, 1)
    return q, scale, minimum


_EXTRACT = {QType.Q4_0: (_q4_0, 18), QType.Q4_1: (_q4_1, 20), QType.Q4_K: (_q4_k, 144)}


def read_int4(tensor: GGUFTensor) -> Int4Weight:
    """A 2-D 4-bit GGUF tensor as Int4Weight in torch layout [out_features, in_features]."""
    extract, block_bytes = _EXTRACT[tensor.tensor_type]
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists the row length first
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, block_bytes)
    q, scale, minimum = extract(blocks)  # per group of 32: [G, 32], [G, 1], [G, 1]
    return Int4Weight(
        torch.from_numpy(q.reshape(rows, cols).astype(np.uint8)),
        torch.from_numpy(scale.reshape(rows, cols // GROUP_SIZE)),
        torch.from_numpy(minimum.reshape(rows, cols // GROUP_SIZE)),
        GROUP_SIZE,
    )


def read_q8_0(tensor: GGUFTensor) -> Int8BlockWeight:
    """A 2-D Q8_0 GGUF tensor as Int8BlockWeight in torch layout [out_features, in_features]."""
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, 34)
    return Int8BlockWeight(
        torch.from_numpy(blocks[:, 2:].copy().view(np.int8).reshape(rows, cols)),
        torch.from_numpy(_fp16(blocks[:, 0:2]).reshape(rows, cols // GROUP_SIZE)),
        GROUP_SIZE,
    )


def read_quantized(tensor: GGUFTensor) -> Int4Weight | Int8BlockWeight:
    """A 2-D tensor of one of KEPT_TYPES, exactly as stored."""
    return read_q8_0(tensor) if tensor.tensor_type == QType.Q8_0 else read_int4(tensor)
