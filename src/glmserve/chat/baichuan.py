"""Baichuan-13B-Chat and Baichuan2-7B/13B-Chat prompts as token ids (Baichuan2's generation_utils.py
`build_chat_input`, Baichuan-13B's `_build_chat_input`).

    [system text] (195 user text) (196 assistant text) ... 195 user text 196

The system text (Baichuan2's; a system message is accepted for Baichuan-13B too) opens the prompt
as plain text with no special token. A round is a user turn and the answers after it. Role ids are
inserted by id: message text is encoded as text, so `<reserved_106>` typed by a user (the text of
id 195 in Baichuan2's vocabulary) can never become a role.

The input budget is context - max_new_tokens: whole rounds are kept newest first while they fit,
as the official code does; unlike it, the system text is never cut from the left: when it and the
newest round cannot fit, a ValueError says so with the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from glmserve.chat.template import message_text

Encode = Callable[[str], list[int]]  # plain text -> ids, never role ids

USER_TOKEN_ID = 195  # generation_config.json user_token_id (all three releases)
ASSISTANT_TOKEN_ID = 196  # assistant_token_id
EOS_TOKEN_ID = 2
# The model ends an answer with eos; a user id means it started the next turn itself.
BAICHUAN_STOP_IDS = (EOS_TOKEN_ID, USER_TOKEN_ID)
ROLE_IDS = {"user": USER_TOKEN_ID, "assistant": ASSISTANT_TOKEN_ID}


def split_rounds(messages: Sequence[Mapping]) -> tuple[str, list[list[tuple[str, str]]]]:
    """(system text, rounds): each round a user turn and what follows it, as (role, text)."""
    if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    system, rounds = "", []
    for i, message in enumerate(messages):
        role, text = message.get("role"), message_text(message.get("content")) or ""
        if role == "system" and i == 0:
            system = text
        elif role not in ROLE_IDS:
            where = "only as the first message" if role == "system" else "user, assistant or a first system"
            raise ValueError(f"unsupported message role {role!r} for Baichuan ({where})")
        elif role == "user" or not rounds:
            rounds.append([(role, text)])
        else:
            rounds[-1].append((role, text))
    return system, rounds


def round_ids(round_: list[tuple[str, str]], encode: Encode) -> list[int]:
    ids: list[int] = []
    for role, text in round_:
        ids += [ROLE_IDS[role], *encode(text)]
    return ids


def baichuan_prompt(
    messages: Sequence[Mapping],
    encode: Encode,
    add_generation_prompt: bool = True,
    max_input_tokens: int | None = None,
) -> list[int]:
    """Prompt ids; with `max_input_tokens` (context - max_new_tokens), the oldest rounds that do
    not fit are left out, whole."""
    system, rounds = split_rounds(messages)
    system_ids = encode(system) if system else []
    is_answer_open = bool(messages) and messages[-1].get("role") == "assistant"
    tail = [ASSISTANT_TOKEN_ID] if add_generation_prompt and not is_answer_open else []
    history = [round_ids(r, encode) for r in rounds]
    if max_input_tokens is not None:
        history = _newest_rounds(history, max_input_tokens - len(system_ids) - len(tail), len(system_ids))
    return system_ids + [i for ids in history for i in ids] + tail


def _newest_rounds(history: list[list[int]], budget: int, num_system_tokens: int) -> list[list[int]]:
    kept: list[list[int]] = []
    for ids in reversed(history):
        if len(ids) > budget:
            break
        kept.insert(0, ids)
        budget -= len(ids)
    if history and not kept:
        raise ValueError(
            f"the system text ({num_system_tokens} tokens) and the last round ({len(history[-1])} tokens) "
            f"do not fit the input budget ({budget + num_system_tokens} tokens left after the answer's "
            "max_new_tokens); shorten them or lower max_new_tokens"
        )
    if budget < 0:
        raise ValueError(f"the system text ({num_system_tokens} tokens) does not fit the input budget")
    return kept
