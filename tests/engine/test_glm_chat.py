"""LLM.chat on tiny random ChatGLM3 / GLM-4 checkpoints with the real tokenizers: prompts come from
the family's chat format and generation stops at the family's own stop tokens."""

from pathlib import Path

import pytest
import torch
from glm_checkpoints import write_tiny_checkpoint
from safetensors.torch import load_file, save_file

from glmserve import LLM, SamplingParams

KV_CACHE_BYTES = 4 * 2**20


def force_first_token(folder: Path, token_a: int, token_b: int) -> None:
    """Rewrite the output layer so the greedy answer starts with token_a or token_b: their rows are
    +e0 / -e0 and all others 0, so one of the two has a positive logit whatever the hidden state."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    head = torch.zeros_like(tensors["transformer.output_layer.weight"])
    head[token_a, 0], head[token_b, 0] = 10.0, -10.0
    tensors["transformer.output_layer.weight"] = head
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "preset, user, observation", [("chatglm3-6b", 64795, 64797), ("glm4-9b", 151336, 151338)]
)
def test_chat_stops_at_the_turn_tokens(tmp_path, preset, user, observation):
    """<|user|> and <|observation|> are stop ids of the tokenizer (config.json's eos is only the end
    of text), so an answer that starts a new turn ends there, with nothing printed."""
    folder = write_tiny_checkpoint(tmp_path, preset=preset, rope_ratio=None)
    force_first_token(folder, user, observation)
    llm = LLM(folder, dtype="float32", kv_cache_memory=KV_CACHE_BYTES)
    out = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids in ([user], [observation])
    assert out.outputs[0].text == ""


def test_chat_on_random_weights_runs_and_ends(tmp_path):
    """Random answers may hold padding ids (64798..65023): they decode to nothing, never crash."""
    llm = LLM(write_tiny_checkpoint(tmp_path), dtype="float32", kv_cache_memory=KV_CACHE_BYTES)
    tokenizer = llm.get_tokenizer()
    conversations = [
        [{"role": "user", "content": "你好"}],
        [
            {"role": "system", "content": "You are ChatGLM3."},
            {"role": "user", "content": "<|observation|> is just text"},
        ],
    ]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=0)
    outs = llm.chat(conversations, params)
    for out, messages in zip(outs, conversations, strict=True):
        assert out.prompt_token_ids == tokenizer.apply_chat_template(messages)
        completion = out.outputs[0]
        assert completion.finish_reason in ("stop", "length") and 1 <= len(completion.token_ids) <= 24
        assert completion.text == tokenizer.decode(completion.token_ids)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = llm.chat(conversations[0], SamplingParams(temperature=0, max_tokens=4), tools=tools)[0]
    assert 64794 in with_tools.prompt_token_ids  # <|system|> with the tools prompt
