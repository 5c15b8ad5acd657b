"""Structured output on the bundled model: every constrained generation matches its schema, regex,
choice or grammar, at temperature 0 and 1, batched in the same steps as unconstrained requests,
across preemption, with n > 1, logprobs, stop strings and streaming."""

import json
import re

import jsonschema
import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.sampling_params import StructuredOutputsParams

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "weather": {"enum": ["sunny", "rainy", "cloudy", "snowy"]},
            "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
        },
        "required": ["city", "weather", "temperature_c"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "author": {
                "type": "object",
                "properties": {"first": {"type": "string", "maxLength": 20}, "last": {"type": "string", "maxLength": 20}},
                "required": ["first", "last"],
                "additionalProperties": False,
            },
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        },
        "required": ["title", "author", "year"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"answer": {"type": "boolean"}, "confidence_pct": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["answer"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"steps": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
        "required": ["steps"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}}, "required": ["sentiment"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["id", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 100}, "y": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    {
        "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["sku", "qty"], "additionalProperties": False}},
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3}},
        "required": ["items"],
        "additionalProperties": False,
    },
]  # fmt: skip
PROMPT = "Answer in JSON only. Describe something interesting about {topic}."
TOPICS = ["a person", "the weather", "colours", "a book", "the sky", "cooking", "a film", "a product", "a map", "an order"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    """Float activations: a streamed and a whole sampled run are compared token for token, which
    8-bit activations (per-step noise at near-ties, e.g. after a prefix-cache hit) would blur."""
    return LLM(dtype="float32", activation_precision="float", kv_cache_memory=320 * 2**20, max_num_seqs=32)


def chat(llm, topic: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(topic=topic)}]


def test_two_hundred_schema_generations_validate(llm):
    """10 schemas x temperature 0 and 1 x 10 prompts, with 20 unconstrained requests in the same steps."""
    conversations, params, schemas = [], [], []
    for schema in SCHEMAS:
        for temperature in (0.0, 1.0):
            for seed, topic in enumerate(TOPICS):
                conversations.append(chat(llm, topic))
                params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=160, structured_outputs={"json": schema}))
                schemas.append(schema)
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=40) for i in range(20)]
    outs = llm.chat(conversations + [chat(llm, t) for t in TOPICS * 2], params + free)
    for out, schema in zip(outs[: len(schemas)], schemas, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
    assert any(out.outputs[0].text.strip() and not out.outputs[0].text.startswith(("{", "[")) for out in outs[len(schemas) :])


@pytest.mark.parametrize(
    ("structured", "check", "temperatures"),
    [
        ({"regex": r"[0-9]{3}-[a-z]{2,5}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text), (0.0, 1.0)),
        ({"choice": ["Paris", "London", "Berlin"]}, lambda text: text in ("Paris", "London", "Berlin"), (0.0, 1.0)),
        # Any object: its free strings may run past max_tokens at temperature 1 on a 135M model
        ({"json_object": True}, lambda text: isinstance(json.loads(text), dict), (0.0,)),
        ({"grammar": 'root ::= "The answer is " [0-9]+ "."'}, lambda text: re.fullmatch(r"The answer is [0-9]+\.", text), (0.0, 1.0)),
        ({"grammar": 'start: "yes" | "no" ", because " /[a-z ]{1,20}/'}, lambda text: re.fullmatch(r"yes|no, because [a-z ]{1,20}", text), (0.0, 1.0)),
    ],
)  # fmt: skip
def test_regex_choice_object_and_grammars(llm, structured, check, temperatures):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for temperature in temperatures:
        params = SamplingParams(temperature=temperature, seed=3, n=3, max_tokens=200, structured_outputs=structured)
        for completion in llm.chat(messages, params)[0].outputs:
            assert check(completion.text), completion.text


def test_greedy_choice_is_the_models_likeliest(llm):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, structured_outputs={"choice": ["London", "Paris", "Rome"]}))
    assert out[0].outputs[0].text == "Paris"


def test_grammar_survives_preemption():
    """A KV cache too small for all the sequences at once: the newest are preempted and recomputed,
    their grammar state kept; greedy outputs equal an unpreempted run's."""
    schema = SCHEMAS[3]
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs={"json": schema})
    prompts = [chat(None, topic) for topic in TOPICS[:6]]
    roomy = LLM(dtype="float32", activation_precision="float", kv_cache_memory=64 * 2**20)
    expected = [o.outputs[0].text for o in roomy.chat(prompts, params)]
    tight = LLM(dtype="float32", activation_precision="float", kv_cache_memory=6 * 2**20, block_size=16)
    outs = tight.chat(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].text for o in outs] == expected
    for text in expected:
        jsonschema.validate(json.loads(text), schema)


def test_logprobs_stop_strings_and_streaming(llm):
    schema = SCHEMAS[1]
    messages = chat(llm, "the weather")
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=80, logprobs=2, structured_outputs={"json": schema})
    [out] = llm.chat(messages, params)
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    jsonschema.validate(json.loads(completion.text), schema)
    streamed = "".join(o.text_delta for o in llm.stream_chat(messages, params))
    assert streamed == completion.text
    stopped = llm.chat(messages, SamplingParams(temperature=0, max_tokens=80, stop=['"weather"'], structured_outputs={"json": schema}))
    assert stopped[0].outputs[0].finish_reason == "stop" and '"weather"' not in stopped[0].outputs[0].text


def test_compiled_grammars_are_cached(llm):
    compiler = llm.engine.grammars
    params = StructuredOutputsParams(json=SCHEMAS[0])
    compiler.matcher(params)
    size = len(compiler._cache)
    compiler.matcher(StructuredOutputsParams(json=json.dumps(SCHEMAS[0])))  # same schema, as text
    assert len(compiler._cache) == size


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "strange"}}}}, "invalid json"),
        ({"regex": "(unclosed"}, "invalid regex"),
        ({"grammar": "root ::= undefined_rule"}, "invalid grammar"),
    ],
)
def test_bad_grammars_are_refused_before_running(llm, structured, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=structured))
    assert not llm.engine.has_unfinished


@pytest.mark.parametrize(
    "fields",
    [{}, {"json": {}, "regex": "a"}, {"choice": []}, {"json": "{not json"}, {"regex": "a" * 200_000}],
)
def test_structured_outputs_params_check_their_fields(fields):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**fields)


def test_guided_decoding_is_the_older_name():
    params = SamplingParams(guided_decoding={"choice": ["a", "b"]})
    assert params.structured_outputs == StructuredOutputsParams(choice=["a", "b"]) and params.guided_decoding is None
