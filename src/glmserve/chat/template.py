"""Chat templates: a model's Jinja template rendered the way Hugging Face renders it, with the
message text fenced off so that user text can never be read as special tokens.

    segments = render_segments(template, messages, special_pattern(["<|im_start|>", "<|im_end|>"]),
                               add_generation_prompt=True)
    # [("<|im_start|>", True), ("user\nHi", False), ("<|im_end|>", True), ("\n", False), ...]

Special segments are one special token each, written by the template; plain segments (template
text and message text together) are encoded as text, so a user typing `<|im_start|>` gets the
ids of those characters, not the role marker.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

Segment = tuple[str, bool]  # (text, is_special)


def special_pattern(special_tokens: Iterable[str]) -> re.Pattern | None:
    """A regex finding special tokens leftmost-longest, as the tokenizers library matches them."""
    tokens = sorted(special_tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def message_text(content: Any) -> str | None:
    """A message's text: a string, None (e.g. an assistant turn holding only tool calls), or the
    text parts of an OpenAI content list, joined by newlines as vLLM does."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_part(part) for part in content)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def render_chat(template: str, messages: Sequence[Mapping], **variables: Any) -> str:
    """The prompt text, exactly as Hugging Face's `apply_chat_template(tokenize=False)` gives it."""
    return _render(template, _with_text_content(messages), variables)


def render_segments(
    template: str, messages: Sequence[Mapping], specials: re.Pattern | None, **variables: Any
) -> list[Segment]:
    """The prompt cut into special tokens (from the template only) and plain text."""
    messages = _with_text_content(messages)
    rendered = _render(template, messages, variables)
    pieces = _render_fenced(template, messages, rendered, variables)
    if pieces is None:
        _check_no_specials(messages, specials)
        pieces = [(rendered, False)]
    return _merge_plain(_split_specials(pieces, specials))


def _text_part(part: Any) -> str:
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
    raise ValueError(f"unsupported message content part {kind!r}: only text parts are supported")


def _with_text_content(messages: Sequence[Mapping]) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    return [{**m, "content": message_text(m.get("content"))} if "content" in m else dict(m) for m in messages]


def _render_fenced(
    template: str, messages: list[dict], rendered: str, variables: dict
) -> list[tuple[str, bool]] | None:
    """Render with each message text replaced by a sentinel and cut there: [(text, is_content)].

    None when the template does more than paste the text in (trims it, escapes it, tests it), so
    putting the texts back does not give the real rendering and the cut cannot be trusted."""
    nonce = uuid.uuid4().hex  # unguessable, so message text cannot fake a sentinel
    texts = [m.get("content") for m in messages]
    fenced = [{**m, "content": f"<{nonce}:{i}>"} if m.get("content") else m for i, m in enumerate(messages)]
    parts = re.split(f"<{nonce}:(\\d+)>", _render(template, fenced, variables))
    # re.split alternates template text and captured message indices: [text, "0", text, "1", text]
    pieces = [(texts[int(part)], True) if i % 2 else (part, False) for i, part in enumerate(parts)]
    return pieces if "".join(text for text, _ in pieces) == rendered else None


def _check_no_specials(messages: list[dict], specials: re.Pattern | None) -> None:
    for message in messages:
        found = specials.search(message["content"]) if specials and message.get("content") else None
        if found:
            raise ValueError(
                f"message text contains the special token {found.group()!r} and this chat template "
                "rewrites message text, so it cannot be kept as plain text safely"
            )


def _split_specials(pieces: list[tuple[str, bool]], specials: re.Pattern | None) -> list[Segment]:
    segments: list[Segment] = []
    for text, is_content in pieces:
        if is_content or specials is None:
            segments.append((text, False))
            continue
        start = 0
        for found in specials.finditer(text):
            segments += [(text[start : found.start()], False), (found.group(), True)]
            start = found.end()
        segments.append((text[start:], False))
    return segments


def _merge_plain(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring plain texts, so BPE sees the same runs as when encoding the whole prompt."""
    merged: list[Segment] = []
    for text, is_special in segments:
        if merged and not is_special and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        elif is_special or text:
            merged.append((text, is_special))
    return merged


def _render(template: str, messages: list[dict], variables: dict) -> str:
    try:
        return _compile(template).render(messages=messages, **variables)
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template error: {error}") from error


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The same environment as transformers' chat templates: templates come from model repos, so
    # they run sandboxed; trim/lstrip blocks and these helpers are what templates are written for.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template does not compile: {error}") from error


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <>&' for HTML; prompts want the plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)
