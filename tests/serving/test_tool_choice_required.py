"""tool_choice "required" with several tools: the model's own log-probabilities of each call header
pick the tool, whose header is then prefilled. The model is the TEST-ONLY scripted decoder, here
also scripted to score prompts (it prefers the `get_time` header)."""

import json

import openai
import pytest
from scripted_decoder import OBSERVATION_ID, ScriptedDecoderEngine, ServerThread

from glmserve.devtools import PRESETS_DIR
from glmserve.engine.outputs import StreamOutput
from glmserve.tokenization.glm import load_glm_tokenizer

CHATGLM3_DIR = PRESETS_DIR / "chatglm3"
TOOLS = [
    {"type": "function", "function": {"name": name, "description": text, "parameters": {"type": "object", "properties": {}}}}
    for name, text in (("get_weather", "Weather of a city"), ("get_time", "Current time"))
]


class ScoringScriptedEngine(ScriptedDecoderEngine):
    """Scores prompts ending in the preferred header higher (-0.1 a token, else -1.0)."""

    def __init__(self, tokenizer, script, preferred_header):
        super().__init__(tokenizer, script)
        self.preferred_header = preferred_header

    async def generate(self, request_id, prompt_ids, params):
        if params.prompt_logprobs is None:
            async for out in super().generate(request_id, prompt_ids, params):
                yield out
            return
        self.prompts.append(list(prompt_ids))
        header, tail = self.preferred_header, prompt_ids[-len(self.preferred_header) :]
        score = -0.1 if tail == header else -1.0
        entries = [None] + [{t: score} for t in prompt_ids[1:]]
        yield StreamOutput(request_id, [2], "", finish_reason="length", prompt_logprobs=entries,
                           num_prompt_tokens=len(prompt_ids))


@pytest.fixture(scope="module")
def server():
    tokenizer = load_glm_tokenizer(CHATGLM3_DIR)
    header = tokenizer.encode("get_time\n", add_special_tokens=False)
    call = tokenizer.encode('```python\ntool_call()\n```', add_special_tokens=False) + [OBSERVATION_ID]

    def script(prompt_ids):
        assert prompt_ids[-len(header) :] == header, "the chosen header must be prefilled"
        return call

    engine = ScoringScriptedEngine(tokenizer, script, header)
    with ServerThread({"chatglm3-scripted": engine}) as running:
        running.engine = engine
        yield running


def test_required_with_several_tools_calls_the_likeliest(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=60, max_retries=0)
    answer = client.chat.completions.create(
        model="chatglm3-scripted", messages=[{"role": "user", "content": "What time is it?"}],
        tools=TOOLS, tool_choice="required",
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    assert len(server.engine.prompts) == 3  # two headers scored, then the call generated
