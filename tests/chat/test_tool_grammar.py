"""Tool-call grammars accept exactly the calls each family's format writes for valid arguments."""

import pytest
from llguidance import LLMatcher

from glmserve.chat import tool_grammar
from glmserve.chat.chatglm import chatglm3_tool_call
from glmserve.chat.glm4 import glm4_tool_call
from glmserve.chat.tool_parsers import ChatGLM3ToolParser, GLM4ToolParser
from glmserve.devtools import PRESETS_DIR
from glmserve.tokenization import load_tokenizer
from glmserve.tokenization.grammar_vocab import grammar_tokenizer

WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
}
FAMILIES = {
    "chatglm3": (ChatGLM3ToolParser, lambda args: chatglm3_tool_call("get_weather", args).replace("True", "true")),
    "glm4": (GLM4ToolParser, lambda args: glm4_tool_call("get_weather", args)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    tokenizer = load_tokenizer(PRESETS_DIR / request.param)
    ll = grammar_tokenizer(tokenizer, tokenizer.vocab_size, tokenizer.stop_token_ids)
    parser_class, write = FAMILIES[request.param]
    return tokenizer, ll, parser_class({"get_weather"}), write


def accepts(family, grammar: str, text: str) -> bool:
    tokenizer, ll, _, _ = family
    matcher = LLMatcher(ll, LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


@pytest.mark.parametrize(
    ("arguments", "valid"),
    [
        ({"city": "Paris"}, True),
        ({"city": "北京", "unit": "f"}, True),
        ({"city": "x", "days": 3, "unit": "c"}, True),
        ({"days": 3}, False),  # city is required
        ({"city": "x", "unit": "kelvin"}, False),  # not in the enum
        ({"city": 3}, False),  # not a string
    ],
)
def test_calls_follow_the_schema(family, arguments, valid):
    _, _, parser, write = family
    grammar = tool_grammar.calls_grammar(parser, [WEATHER], parallel=False)
    text = f"get_weather\n{write(arguments)}"
    assert accepts(family, grammar, text) == valid
    if valid:
        [call] = parser.parse(text).tool_calls
        assert call.name == "get_weather"


def test_auto_allows_an_answer_or_a_call(family):
    _, _, parser, write = family
    grammar = tool_grammar.auto_grammar(parser, [WEATHER], parallel=True)
    assert accepts(family, grammar, "\nIt is sunny today.\nBye")
    call = f"get_weather\n{write({'city': 'a'})}"
    assert accepts(family, grammar, call)
    assert not accepts(family, grammar, "Sunny")  # neither: no empty metadata line, no tool name


def test_fifty_parameters_compile_quickly(family):
    _, ll, parser, _ = family
    properties = {f"p{i}": {"type": "integer"} for i in range(50)}
    tool = {"name": "big", "parameters": {"type": "object", "properties": properties, "required": ["p49"]}}
    matcher = LLMatcher(ll, LLMatcher.grammar_from_lark(tool_grammar.arguments_grammar(parser, tool)), log_level=0)
    assert not matcher.is_error()
