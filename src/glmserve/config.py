"""Configuration dataclasses: what a checkpoint says (ModelConfig) and how to run it (EngineConfig).

ModelConfig is read once from config.json or GGUF metadata and never mutated afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a checkpoint, in Hugging Face terms."""

    architecture: str  # model family key: "llama" (Llama, SmolLM2, Qwen2), later "glm", "baichuan"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, e.g. "bfloat16"
    # generation_config.json as saved with the checkpoint ({} for a GGUF): sampling defaults, EOS ids.
    generation_config: dict = field(default_factory=dict, compare=False, hash=False)
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # family-specific keys


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Declared once; derived values live elsewhere."""

    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # Weight-only quantization of linear layers. None: as the checkpoint is (a GGUF's Q4_0/Q4_1/Q4_K
    # weights stay 4-bit, exactly); "none": all float; "int8": per-channel; "int4": group-wise.
    quantization: str | None = None
    quantization_group_size: int = 64  # int4 group size when quantizing float weights (divides 576, 4096, 13696)
    # int8 (default): int4/int8 weights on CPU multiply activations quantized to int8 per block of 32
    # (native kernels, as llama.cpp); float: activations stay in the compute dtype (PyTorch's kernels).
    activation_precision: str = "int8"
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: float = 0.25  # bytes if > 1, else a fraction of free memory
    enable_prefix_caching: bool = True
    max_loras: int = 4  # LoRA adapters resident at once (the most one step can mix); others load on demand
    num_threads: int | None = None  # default: physical cores
    seed: int = 0
