"""ChatGLM3-6B / GLM-4-9B GGUF files (llama.cpp arch `chatglm`, written as its converter writes them
by glm_gguf_files.py) against the THUDM folder they were converted from: the same config, the same
logits, the same token ids and chat prompts, from the real tokenizer files and tiny random weights."""

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QType
from glm_checkpoints import write_tiny_checkpoint
from glm_gguf_files import write_chatglm_gguf, write_roundtrip_folder

from glmserve import LLM, SamplingParams
from glmserve.config import EngineConfig
from glmserve.engine.checkpoint import open_checkpoint
from glmserve.engine.device import Placement
from glmserve.engine.layers.quant import Int4Weight
from glmserve.engine.model_runner import ModelRunner
from glmserve.engine.scheduler import ScheduledBatch
from glmserve.engine.sequence import Sequence
from glmserve.tokenization import load_tokenizer
from glmserve.tokenization.glm import ChatGLMTokenizer, GLM4Tokenizer

FAMILIES = {"chatglm3": "chatglm3-6b", "glm4": "glm4-9b"}
TEXTS = [
    "Hello world",
    "你好，世界！今天天气怎么样？",
    "emoji 🙂🚀 and accents: café naïve",
    "def f(x):\n    return x  # two spaces\n\n\ttab",
    "  leading and trailing  ",
    "数字 1234567 and mixed中英文text",
    "<|system|>You are root<|observation|>{}<|user|>[gMASK]sop<|endoftext|>[MASK]<sop>",
    "",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. 请用中文回答。"},
    {"role": "user", "content": "北京天气如何？ <|user|>"},
    {"role": "assistant", "content": "我来查一下。"},
    {"role": "user", "content": "  thanks\n"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (THUDM folder, its F32 GGUF with the real vocabulary)."""
    root = tmp_path_factory.mktemp("glm_gguf")
    out = {}
    for family, preset in FAMILIES.items():
        folder = write_tiny_checkpoint(root / family, preset=preset)
        out[family] = (folder, write_chatglm_gguf(root / f"{family}.gguf", folder))
    return out


def prompt_logits(path: Path, prompt: list[int], dtype: str = "float32") -> torch.Tensor:
    """[len(prompt), vocab] float32 logits at every prompt position, one prefill through the
    engine's ModelRunner (paged KV cache)."""
    checkpoint = open_checkpoint(path)
    config = EngineConfig(dtype=dtype, activation_precision="float")  # exact: the weights are compared
    runner = ModelRunner(checkpoint.config, config, Placement.resolve(config), checkpoint, [])
    num_blocks = len(prompt) // runner.block_size + 1
    runner.allocate_kv_cache(num_blocks + 1)
    captured = []
    compute_logits = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: captured.append(compute_logits(hidden)) or captured[-1]
    seq = Sequence("r", prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    seq.block_table = list(range(1, num_blocks + 1))
    runner.run(ScheduledBatch([seq], [seq.num_tokens]))
    prompt_rows, last_row = captured  # scoring of positions 0..n-2, then sampling at n-1
    return torch.cat([prompt_rows, last_row])


# ---------------------------------------------------------------- config and weights


@pytest.mark.parametrize("family", FAMILIES)
def test_config_equals_folder_config(files, family):
    folder, path = files[family]
    ours, theirs = open_checkpoint(path).config, open_checkpoint(folder).config
    assert ours.architecture == "chatglm" and ours.extra["model_type"] == "chatglm"
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "attention_bias"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)  # float32 in GGUF
    assert ours.extra["partial_rotary_factor"] == 0.5
    # ChatGLM3's config.json says only 2; its chat format also stops at <|user|> and <|observation|>.
    assert ours.eos_token_ids == {"chatglm3": (2, 64795, 64797), "glm4": (151329, 151336, 151338)}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_equal_folder_logits(files, family):
    folder, path = files[family]
    prompt = load_tokenizer(folder).apply_chat_template(CONVERSATION)
    torch.testing.assert_close(prompt_logits(path, prompt), prompt_logits(folder, prompt), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- tokenizer and chat format


@pytest.fixture(scope="module")
def tokenizers(files) -> dict[str, tuple]:
    return {
        family: (load_tokenizer(folder), load_tokenizer(path)) for family, (folder, path) in files.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ids_equal_folder_ids(tokenizers, family):
    folder_tok, gguf_tok = tokenizers[family]
    assert type(gguf_tok) is {"chatglm3": ChatGLMTokenizer, "glm4": GLM4Tokenizer}[family]
    for text in TEXTS:
        assert gguf_tok.encode(text) == folder_tok.encode(text), text
        assert gguf_tok.encode(text, parse_special=True) == folder_tok.encode(text, parse_special=True), text
        assert gguf_tok.decode(gguf_tok.encode(text)) == text
    for name in ("special_ids", "stop_token_ids", "eos_token_id", "bos_token_id", "vocab_size"):
        assert getattr(gguf_tok, name) == getattr(folder_tok, name), name


def test_chatglm3_sentencepiece_model_equals_the_original(tokenizers):
    """Every piece, score and type, so no text can encode differently."""
    folder_sp, gguf_sp = tokenizers["chatglm3"][0].sp, tokenizers["chatglm3"][1].sp
    assert gguf_sp.vocab_size() == folder_sp.vocab_size() == 64789
    for i in range(3, 64789):
        assert gguf_sp.id_to_piece(i) == folder_sp.id_to_piece(i)
    assert [gguf_sp.get_score(i) for i in range(64789)] == [folder_sp.get_score(i) for i in range(64789)]
    assert [gguf_sp.is_byte(i) for i in range(300)] == [folder_sp.is_byte(i) for i in range(300)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_prompt_ids_equal_folder_ids(tokenizers, family, tools):
    folder_tok, gguf_tok = tokenizers[family]
    expected = folder_tok.apply_chat_template(CONVERSATION, tools=tools)
    assert gguf_tok.apply_chat_template(CONVERSATION, tools=tools) == expected
    assert expected[:2] == {"chatglm3": [64790, 64792], "glm4": [151331, 151333]}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_chats_with_the_family_format(files, family):
    _, path = files[family]
    llm = LLM(path, dtype="float32", kv_cache_memory=2**22)
    assert llm.generation_defaults.temperature == 0.8  # ChatGLM's demo defaults
    stops = {"chatglm3": {2, 64795, 64797}, "glm4": {151329, 151336, 151338}}[family]
    assert stops <= llm.engine.stop_token_ids
    out = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.prompt_token_ids == llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "你好"}]
    )
    assert 1 <= len(out.outputs[0].token_ids) <= 4


# ---------------------------------------------------------------- errors


def test_missing_metadata_is_a_clear_error(files, tmp_path):
    folder, _ = files["chatglm3"]
    path = write_chatglm_gguf(
        tmp_path / "norope.gguf", folder, with_vocab=False, drop_keys=("chatglm.rope.dimension_count",)
    )
    with pytest.raises(ValueError, match="no 'chatglm.rope.dimension_count'"):
        open_checkpoint(path)
    path = write_chatglm_gguf(tmp_path / "novocab.gguf", folder, with_vocab=False)
    with pytest.raises(ValueError, match="no 'tokenizer.ggml.model'"):
        load_tokenizer(path)


# ---------------------------------------------------------------- quantized and split layouts


@pytest.fixture(scope="module")
def chatglm3_folder(tmp_path_factory) -> Path:
    """Weights-only files from here on: the real ChatGLM3 shape but no tokenizer in the GGUF."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "chatglm3", seed=1)


PROMPT = [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 30910, 13, 12, 7, 65000, 64797]


@pytest.mark.parametrize("qtype", [QType.F16, QType.Q8_0, QType.Q4_0], ids=lambda qtype: qtype.name)
def test_quantized_logits_equal_dequantized_folder_logits(chatglm3_folder, tmp_path, qtype):
    path = write_chatglm_gguf(tmp_path / f"{qtype.name}.gguf", chatglm3_folder, qtype, with_vocab=False)
    reference = write_roundtrip_folder(chatglm3_folder, tmp_path / "roundtrip", qtype)
    torch.testing.assert_close(
        prompt_logits(path, PROMPT), prompt_logits(reference, PROMPT), atol=1e-4, rtol=0
    )


def test_q4_0_weights_stay_4_bit(chatglm3_folder, tmp_path):
    path = write_chatglm_gguf(tmp_path / "q4.gguf", chatglm3_folder, QType.Q4_0, with_vocab=False)
    tensors = dict(open_checkpoint(path).iter_tensors(torch.bfloat16, keep_quantized=True))
    block = "transformer.encoder.layers.1"
    for name in (
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ):
        assert isinstance(tensors[f"{block}.{name}.weight"], Int4Weight), name
    assert tensors[f"{block}.self_attention.query_key_value.bias"].dtype == torch.bfloat16
    assert tensors[f"{block}.input_layernorm.weight"].dtype == torch.bfloat16
    # bf16 runs the packed int4 kernels (query_key_value adds its bias after them).
    reference = write_roundtrip_folder(chatglm3_folder, tmp_path / "roundtrip", QType.Q4_0)
    ours, expected = prompt_logits(path, PROMPT, "bfloat16"), prompt_logits(reference, PROMPT, "bfloat16")
    torch.testing.assert_close(ours, expected, atol=0.05, rtol=0)


def test_split_qkv_from_transformers_layout_loads_as_glm(chatglm3_folder, tmp_path):
    """Newer converters take transformers' GlmForCausalLM (glm-4-9b-chat-hf) to attn_q/k/v."""
    split = write_tiny_checkpoint(tmp_path / "glm", layout="glm", seed=1)
    path = write_chatglm_gguf(
        tmp_path / "split.gguf", chatglm3_folder, weights_folder=split, with_vocab=False
    )
    assert open_checkpoint(path).config.architecture == "glm"
    torch.testing.assert_close(
        prompt_logits(path, PROMPT), prompt_logits(chatglm3_folder, PROMPT), atol=1e-5, rtol=0
    )
