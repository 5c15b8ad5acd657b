"""Prefix caching across a conversation and across requests sharing a prefix.

    .venv/bin/python benchmarks/multiturn.py [--turns 10] [--system-tokens 1000]

1. A 10-turn conversation under a ~1,000-token system prompt: time to first token of each turn,
   with prefix caching on and off (same engine settings otherwise).
2. Two requests sharing an ~800-token prefix: prefill time of the second relative to the first.
Writes benchmarks/results/multiturn.json. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

from common import print_table, save_json

from glmserve import LLM, SamplingParams

FACTS = [
    "The library opens at nine and closes at six.", "Members may borrow up to five books.",
    "Late returns cost ten cents per day.", "The reading room is on the second floor.",
    "Children's books are shelved near the entrance.", "Quiet hours are from two to four.",
]


def system_prompt(llm: LLM, num_tokens: int) -> str:
    tok, text, i = llm.get_tokenizer(), "You are the assistant of a public library. Rules:\n", 0
    while len(tok.encode(text)) < num_tokens:
        text += f"{i + 1}. {FACTS[i % len(FACTS)]}\n"
        i += 1
    return text


def time_to_first_token(llm: LLM, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start, first, text = time.perf_counter(), None, ""
    for out in llm.stream_chat(messages, params):
        first = first or time.perf_counter()
        text += out.text_delta
    return first - start, text


def conversation(llm: LLM, system: str, turns: int) -> list[float]:
    messages, ttfts = [{"role": "system", "content": system}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: what is rule {turn + 1} about?"})
        ttft, answer = time_to_first_token(llm, messages, 24)
        messages.append({"role": "assistant", "content": answer})
        ttfts.append(ttft)
    return ttfts


def shared_prefix(llm: LLM, prefix_tokens: int) -> tuple[float, float]:
    tok = llm.get_tokenizer()
    prefix = tok.encode(system_prompt(llm, prefix_tokens))[:prefix_tokens]
    times = []
    for suffix in ("Summarise the rules.", "Which rule is the strictest?"):
        ids = prefix + tok.encode(suffix)
        start = time.perf_counter()
        next(iter(llm.stream(ids, SamplingParams(temperature=0, max_tokens=1))))
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    results = {}
    for caching in (True, False):
        llm = LLM(dtype=args.dtype, kv_cache_memory=256 * 2**20, enable_prefix_caching=caching)
        system = system_prompt(llm, args.system_tokens)
        conversation(llm, system[:200], 2)  # warm-up
        results[caching] = {"ttft_s": conversation(llm, system, args.turns), "shared_prefix_s": shared_prefix(llm, 800)}
        del llm
    on, off = results[True]["ttft_s"], results[False]["ttft_s"]
    rows = [[i + 1, f"{1000 * a:.0f}", f"{1000 * b:.0f}"] for i, (a, b) in enumerate(zip(on, off, strict=True))]
    print_table(f"Time to first token per turn (ms), ~{args.system_tokens}-token system prompt",
                ["turn", "prefix caching on", "off"], rows)
    first, second = results[True]["shared_prefix_s"]
    print(f"\nturn {args.turns} / turn 1 TTFT with caching: {on[-1] / on[0]:.2f}x (without: {off[-1] / off[0]:.2f}x)")
    print(f"800-token shared prefix: first request {1000 * first:.0f} ms, second {1000 * second:.0f} ms "
          f"({second / first:.2f}x)")
    path = save_json("multiturn", {"turns": args.turns, "system_tokens": args.system_tokens,
                                   "ttft_caching_on_s": on, "ttft_caching_off_s": off,
                                   "shared_prefix_first_s": first, "shared_prefix_second_s": second})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
