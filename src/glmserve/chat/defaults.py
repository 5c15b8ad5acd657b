"""Each model family's default generation settings, shared by the CLI, the classic API and the UI.

- ChatGLM2/3 and GLM-4: their official demos' max_length 8192, temperature 0.8, top_p 0.8.
- Baichuan-13B-Chat and Baichuan2-Chat: their generation_config.json's temperature 0.3, top_k 5,
  top_p 0.85, repetition_penalty 1.05 (Baichuan2) / 1.1 (Baichuan-13B, told by its 64000 vocabulary).
- Others: as transformers does, sample only if the checkpoint's generation_config.json says
  `do_sample` (with its temperature / top_p / top_k / repetition_penalty); otherwise greedy.
  A GGUF carries no generation config, so the bundled SmolLM2 answers greedily by default
  (its first answer token to "What is the capital of France?" is a near tie).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.config import ModelConfig

CHATGLM_MODEL_TYPES = frozenset({"chatglm", "glm", "glm4"})
BAICHUAN13B_VOCAB_SIZE = 64000  # Baichuan2's is 125696


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request gets for a field it leaves out (or sends as "" on the classic API)."""

    max_length: int  # prompt plus answer, ChatGLM's meaning
    temperature: float
    top_p: float
    top_k: int = 0
    repetition_penalty: float = 1.0


def model_generation_defaults(model_config: ModelConfig, max_model_len: int) -> GenerationDefaults:
    """The defaults of a loaded model, whose context is `max_model_len` tokens."""
    model_type = model_config.extra.get("model_type", model_config.architecture)
    return generation_defaults(model_type, max_model_len, model_config.generation_config, model_config.vocab_size)


def generation_defaults(
    model_type: str, max_model_len: int, generation_config: dict, vocab_size: int | None = None
) -> GenerationDefaults:
    if model_type in CHATGLM_MODEL_TYPES:
        return GenerationDefaults(max_length=min(8192, max_model_len), temperature=0.8, top_p=0.8)
    if model_type == "baichuan":
        penalty = 1.1 if vocab_size == BAICHUAN13B_VOCAB_SIZE else 1.05
        return GenerationDefaults(max_model_len, temperature=0.3, top_p=0.85, top_k=5, repetition_penalty=penalty)
    if not generation_config.get("do_sample", False):
        return GenerationDefaults(max_length=max_model_len, temperature=0.0, top_p=1.0)
    return GenerationDefaults(
        max_length=max_model_len,
        temperature=float(generation_config.get("temperature", 1.0)),
        top_p=float(generation_config.get("top_p", 1.0)),
        top_k=int(generation_config.get("top_k", 0) or 0),
        repetition_penalty=float(generation_config.get("repetition_penalty", 1.0)),
    )
