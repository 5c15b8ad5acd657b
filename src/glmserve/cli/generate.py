"""`glmserve generate`: a JSONL file of requests -> checked requests -> one batched run -> JSONL.

Every line stays an item, in order: a request the engine runs, or the one-line reason it cannot
run (bad JSON, unknown fields, a prompt past the context), so no line is ever dropped silently.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from typing import Annotated, Any, TextIO

import typer

from glmserve.cli.common import (
    ActivationPrecision,
    ActivationPrecisionOption,
    Dtype,
    DtypeOption,
    MaxModelLenOption,
    ModelOption,
    QuantizationOption,
    fail,
    load_llm,
    make_params,
)
from glmserve.engine.sampling_params import SamplingParams
from glmserve.serving.errors import APIError
from glmserve.serving.structured_outputs import structured_outputs_of

# As the OpenAI API's response_format, or vLLM's structured_outputs (serving/structured_outputs.py)
STRUCTURED_FIELDS = ("response_format", "structured_outputs")
LINE_PARAM_TYPES = {
    "max_tokens": "int",
    "seed": "int",
    "temperature": "number",
    "top_p": "number",
    "stop": "str_list",
}


@dataclass
class BatchItem:
    """One non-blank input line: a request to run, or the reason it cannot run."""

    index: int
    line_no: int
    prompt: str | list[dict] | None = None  # text, or a list of chat messages
    params: SamplingParams | None = None
    error: str | None = None
    result: dict | None = None

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def is_param_type(value: Any, kind: str) -> bool:
    if kind == "str_list":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int if kind == "int" else is_int or isinstance(value, float)


def is_message_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def parse_line(text: str, defaults: dict) -> tuple[str | list[dict], SamplingParams]:
    """One JSONL request -> (prompt or messages, params). Raises ValueError with a one-line reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(obj.keys() - {"prompt", "messages", *STRUCTURED_FIELDS} - LINE_PARAM_TYPES.keys())
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("need exactly one of 'prompt' (a string) or 'messages' (a list)")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise ValueError("'prompt' must be a string")
    if "messages" in obj and not is_message_list(obj["messages"]):
        raise ValueError('\'messages\' must be a non-empty list of {"role": str, "content": str}')
    overrides = {k: v for k, v in obj.items() if k in LINE_PARAM_TYPES}
    for name, value in overrides.items():
        if not is_param_type(value, LINE_PARAM_TYPES[name]):
            raise ValueError(f"'{name}' must be of type {LINE_PARAM_TYPES[name]}")
    try:
        structured = structured_outputs_of(obj.get("response_format"), None, obj.get("structured_outputs"))
    except APIError as error:
        raise ValueError(error.message) from None
    params = SamplingParams(**{**defaults, **overrides}, structured_outputs=structured)
    return obj.get("prompt", obj.get("messages")), params


def read_items(lines: list[str], defaults: dict) -> list[BatchItem]:
    items: list[BatchItem] = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = BatchItem(index=len(items), line_no=line_no)
        try:
            item.prompt, item.params = parse_line(text, defaults)
        except ValueError as e:
            item.error = str(e)
        items.append(item)
    return items


def check_item(item: BatchItem, llm: Any) -> list[int] | None:
    """The prompt's token ids; sets item.error for what the engine would refuse (it rejects
    a whole batch for one bad request: a prompt past the context, a schema that does not compile),
    and clamps max_tokens to the room left."""
    tokenizer, max_model_len = llm.get_tokenizer(), llm.max_model_len
    try:
        if item.is_chat:
            prompt_ids = tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True)
        else:
            # As llm.generate(text) does: special-token strings in a raw prompt are recognised.
            prompt_ids = tokenizer.encode(item.prompt, add_special_tokens=True, parse_special=True)
    except Exception as e:  # a malformed conversation fails its own line, never the batch
        item.error = f"cannot build the prompt: {e}"
        return None
    room = max_model_len - len(prompt_ids)
    if not prompt_ids:
        item.error = "the prompt is empty"
    elif room < 1:
        item.error = f"prompt too long: {len(prompt_ids)} tokens, the context limit is {max_model_len}"
    if not item.error and item.params.structured_outputs is not None:
        try:  # compiled here, so that a bad schema fails its own line, not the batch
            llm.engine.grammars.matcher(item.params.structured_outputs)
        except ValueError as e:
            item.error = str(e)
    if item.error:
        return None
    if item.params.max_tokens is None or item.params.max_tokens > room:
        item.params = replace(item.params, max_tokens=room)  # finishes with "length" at the context limit
    return prompt_ids


def run_batch(llm: Any, items: list[BatchItem]) -> None:
    """Run every runnable item: at most one batched llm.generate and one llm.chat call."""
    prompt_ids: dict[int, list[int] | None] = {}
    for item in items:
        if not item.error:
            prompt_ids[item.index] = check_item(item, llm)
    runnable = [item for item in items if not item.error]  # check_item may have set errors
    texts = [item for item in runnable if not item.is_chat]
    chats = [item for item in runnable if item.is_chat]
    if texts:
        inputs = [{"prompt_token_ids": prompt_ids[item.index]} for item in texts]
        collect(texts, llm.generate(inputs, [item.params for item in texts], use_tqdm=True))
    if chats:
        collect(
            chats, llm.chat([item.prompt for item in chats], [item.params for item in chats], use_tqdm=True)
        )


def collect(items: list[BatchItem], outputs: list[Any]) -> None:
    for item, out in zip(items, outputs, strict=True):
        completion = out.outputs[0]
        item.result = {
            "index": item.index,
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(completion.token_ids),
        }


# ---------------------------------------------------------------- the command


def read_lines(path: str) -> list[str]:
    source = open_stream(path, "r")
    try:
        return source.readlines()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text: {e.reason}")
    finally:
        if source is not sys.stdin:
            source.close()


def open_stream(path: str, mode: str) -> TextIO:
    if path == "-":
        return sys.stdin if "r" in mode else sys.stdout
    try:
        return open(path, mode, encoding="utf-8")
    except OSError as e:
        fail(f"cannot open {path}: {e.strerror}")


def generate(
    input_path: Annotated[str, typer.Option("--input", "-i", help="JSONL requests, `-` for stdin")],
    output_path: Annotated[str, typer.Option("--output", "-o", help="JSONL results, `-` for stdout")] = "-",
    model: ModelOption = None,
    dtype: DtypeOption = Dtype.auto,
    max_model_len: MaxModelLenOption = None,
    quantization: QuantizationOption = None,
    activation_precision: ActivationPrecisionOption = ActivationPrecision.int8,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Default 256", show_default=False)] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Default 1.0; 0 is greedy", show_default=False)
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Default 1.0", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed for every line", show_default=False)] = None,
) -> None:
    """Run a JSONL file of requests as one batch, with a progress bar.

    Each line is {"prompt": "..."} or {"messages": [...]}, optionally with max_tokens,
    temperature, top_p, stop, seed, and response_format (as OpenAI's: json_object, json_schema)
    or structured_outputs (as vLLM's: json, regex, choice, grammar). Each writes one line, in order: {"index", "text",
    "finish_reason", "prompt_tokens", "completion_tokens"}, or {"index", "line", "error"}.
    """
    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    defaults = {name: value for name, value in given.items() if value is not None}
    make_params(**defaults)
    items = read_items(read_lines(input_path), defaults)
    sink = open_stream(output_path, "w")
    if any(not item.error for item in items):
        llm = load_llm(model, dtype, max_model_len, quantization, activation_precision)
        try:
            run_batch(llm, items)
        except ValueError as e:  # the engine refused the batch: nothing was written yet
            fail(str(e))
    write_results(items, sink)
    if sink is not sys.stdout:
        sink.close()


def write_results(items: list[BatchItem], sink: TextIO) -> None:
    for item in items:
        if item.error:
            typer.echo(f"warning: line {item.line_no}: {item.error}", err=True)
        record = item.result or {"index": item.index, "line": item.line_no, "error": item.error}
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()
    num_failed = sum(1 for item in items if item.error)
    typer.echo(f"{len(items) - num_failed} ok, {num_failed} failed", err=True)
