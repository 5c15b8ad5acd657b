"""Golden token ids of the tools system prompt, a replayed tool call and an observation turn,
with the real ChatGLM3 and GLM-4 tokenizer files."""


import pytest

from glmserve.devtools import PRESETS_DIR
from glmserve.tokenization.glm import load_glm_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]  # fmt: skip
CALL = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "21"},
]
# [gMASK] sop <|system|> "\n" + THUDM's tool prompt + the tools as indented JSON, ...
CHATGLM3_GOLDEN = [
    64790, 64792, 64794, 30910, 13, 20115, 267, 1762, 2554, 362, 1077, 362, 344, 457, 30930, 809, 431, 1675,
    289, 267, 1762, 4159, 30954, 13, 30995, 13, 296, 30982, 13, 352, 30955, 2323, 2932, 449, 752, 30962,
    27564, 1252, 13, 352, 30955, 16302, 2932, 449, 2266, 1041, 1252, 13, 352, 30955, 24940, 2932, 729, 13,
    753, 30955, 3543, 2932, 449, 8178, 1252, 13, 753, 30955, 27448, 2932, 729, 13, 647, 30955, 17654, 2932,
    729, 13, 647, 296, 30955, 3543, 2932, 449, 4423, 30955, 13, 647, 30983, 13, 753, 4143, 13, 753, 30955,
    20379, 2932, 790, 13, 647, 30955, 17654, 30955, 13, 753, 30996, 13, 352, 30983, 13, 296, 30983, 13,
    30996, 64795, 30910, 13, 8686, 64796, 634, 30962, 27564, 13, 16014, 23720, 13, 22268, 30962, 10372,
    30946, 17654, 1104, 6078, 276, 2479, 13, 10846, 31040, 64797, 30910, 13, 30910, 30943, 30939, 64796,
]  # fmt: skip
# ... <|user|> "\nHi" <|assistant|> "get_weather\n{json}" <|observation|> "\n21" <|assistant|>
GLM4_TAIL = [
    151336, 198, 13041, 151337, 455, 68852, 198, 4913, 8923, 788, 330, 59190, 9204, 151338, 198, 99146, 151337,
]  # fmt: skip


@pytest.fixture(scope="module")
def chatglm3():
    return load_glm_tokenizer(PRESETS_DIR / "chatglm3")


def test_chatglm3_tools_call_and_observation_golden(chatglm3):
    assert chatglm3.apply_chat_template(MESSAGES, tools=TOOLS) == CHATGLM3_GOLDEN


def test_chatglm3_turns_are_encoded_piece_by_piece(chatglm3):
    ids = chatglm3.apply_chat_template(MESSAGES, tools=TOOLS)
    call_turn = [64796, *chatglm3.encode_text("get_weather\n"),
                 *chatglm3.encode_text('```python\ntool_call(city="Paris")\n```')]  # fmt: skip
    observation = [64797, *chatglm3.encode_text("\n"), *chatglm3.encode_text("21"), 64796]
    assert ids[-len(call_turn + observation) :] == call_turn + observation


def test_glm4_call_and_observation_golden():
    glm4 = load_glm_tokenizer(PRESETS_DIR / "glm4")
    ids = glm4.apply_chat_template(MESSAGES, tools=TOOLS)
    assert ids[:3] == [151331, 151333, 151335] and ids[-len(GLM4_TAIL) :] == GLM4_TAIL
