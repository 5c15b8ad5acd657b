"""Independent references for the loader tests, written from the GGUF spec and llama.cpp's converter.

Block formats (ggml-quants.c / GGUF spec), 32 weights per block, little endian:
  Q8_0: d:f16, qs:int8[32]             w[j] = d * qs[j]
  Q4_0: d:f16, qs:uint8[16]            w[j] = d * (lo(qs[j]) - 8), w[j+16] = d * (hi(qs[j]) - 8)
  Q4_1: d:f16, m:f16, qs:uint8[16]     w[j] = d * lo(qs[j]) + m,   w[j+16] = d * hi(qs[j]) + m
"""

from __future__ import annotations

import numpy as np

Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])


def dequantize_q8_0(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.frombuffer(raw, Q8_0_BLOCK)
    return (blocks["d"].astype(np.float32)[:, None] * blocks["qs"]).reshape(shape)


def dequantize_q4_0(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.frombuffer(raw, Q4_0_BLOCK)
    return (blocks["d"].astype(np.float32)[:, None] * (_nibbles(blocks["qs"]) - 8)).reshape(shape)


def dequantize_q4_1(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.frombuffer(raw, Q4_1_BLOCK)
    d = blocks["d"].astype(np.float32)[:, None]
    m = blocks["m"].astype(np.float32)[:, None]
    return (d * _nibbles(blocks["qs"]) + m).reshape(shape)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # [num_blocks, 16] bytes -> [num_blocks, 32] values: low nibbles are weights 0..15, high 16..31.
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py (HF q/k rows -> GGUF rows)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
