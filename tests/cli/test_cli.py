"""The `glmserve` command: end to end through subprocesses on the bundled model, plus the
chat-history and batching rules in process against a stand-in engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmserve.cli import ChatSession
from glmserve.cli.generate import parse_line, read_items, run_batch
from glmserve.engine.outputs import CompletionOutput, RequestOutput, StreamOutput
from glmserve.engine.sampling_params import SamplingParams


def run_cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MODEL_PATH"}
    full_env.update(PYTHONIOENCODING="utf-8", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "glmserve", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=full_env,
        timeout=300,
    )


def assert_clean(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- end to end, bundled model


def test_help_lists_commands():
    proc = run_cli("--help")
    assert_clean(proc)
    assert "chat" in proc.stdout and "generate" in proc.stdout


def test_chat_answers_greedily_and_stops():
    proc = run_cli(
        "chat", "--temperature", "0", "--max-length", "256", stdin="What is the capital of France?\nstop\n"
    )
    assert_clean(proc)
    assert "用户/User:" in proc.stdout
    answer = proc.stdout.split("助手/Assistant:", 1)[1]
    assert "Paris" in answer


def test_chat_clear_then_eof_exits_cleanly():
    proc = run_cli("chat", "--temperature", "0", "--max-length", "128", stdin="Hello!\nclear\n")
    assert_clean(proc)
    assert "history cleared" in proc.stdout
    assert proc.stdout.count("用户/User:") == 3  # the third prompt meets EOF


def test_chat_eof_at_first_prompt():
    proc = run_cli("chat", stdin="")
    assert_clean(proc)
    assert "glmserve chat" in proc.stdout


def test_generate_keeps_order_and_reports_bad_lines(tmp_path: Path, bundled_gguf: Path):
    lines = [
        json.dumps({"prompt": "The capital of France is", "max_tokens": 8}),
        "{not json",
        "",
        json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "stop": ["\n"]}),
        json.dumps({"max_tokens": 8}),
        json.dumps({"prompt": "Hello", "temperature": -1}),
        json.dumps({"prompt": "word " * 2000}),
        json.dumps({"prompt": "你好", "max_tokens": 4, "seed": 1, "temperature": 0.7}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_cli(
        "generate", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
        "--model", str(bundled_gguf), "--max-model-len", "512", "--temperature", "0", "--max-tokens", "16",
    )  # fmt: skip
    assert_clean(proc)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert {r["line"] for r in records if "error" in r} == {2, 5, 6, 7}
    assert "invalid JSON" in records[1]["error"]
    assert "temperature" in records[4]["error"]
    assert "prompt too long" in records[5]["error"]
    for record, max_tokens in [(records[0], 8), (records[2], 16), (records[6], 4)]:
        assert record["finish_reason"] in ("stop", "length")
        assert 0 < record["prompt_tokens"] and 0 < record["completion_tokens"] <= max_tokens
        assert isinstance(record["text"], str)
    assert "warning: line 2:" in proc.stderr
    assert "3 ok, 4 failed" in proc.stderr


def test_generate_lines_with_structured_output(bundled_gguf: Path):
    schema = {"type": "object", "properties": {"capital": {"enum": ["Paris", "Rome"]}}, "required": ["capital"],
              "additionalProperties": False}  # fmt: skip
    lines = [
        {"messages": [{"role": "user", "content": "Capital of France?"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}},
        {"prompt": "Is water wet?", "structured_outputs": {"choice": ["yes", "no"]}},
        {"prompt": "x", "structured_outputs": {"regex": "(unclosed"}},
        {"prompt": "x", "response_format": {"type": "xml"}},
    ]  # fmt: skip
    proc = run_cli("generate", "-i", "-", "-o", "-", "--model", str(bundled_gguf), "--temperature", "0",
                   stdin="".join(json.dumps(line) + "\n" for line in lines))  # fmt: skip
    assert_clean(proc)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert json.loads(records[0]["text"]) == {"capital": "Paris"}
    assert records[1]["text"] in ("yes", "no")
    assert "invalid regex" in records[2]["error"] and "xml" in records[3]["error"]


def test_generate_stdin_to_stdout(bundled_gguf: Path):
    proc = run_cli("generate", "-i", "-", "-o", "-", "--model", str(bundled_gguf), "--max-tokens", "4",
                   stdin='{"prompt": "One, two,"}\n')  # fmt: skip
    assert_clean(proc)
    (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert record["index"] == 0 and record["completion_tokens"] <= 4


# ---------------------------------------------------------------- user errors: one line, exit 1


@pytest.mark.parametrize("command", [["chat"], ["generate", "-i", "-"]])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_missing_model_is_one_line(command: list[str], how: str):
    missing = "/nonexistent/model.gguf"
    args, env = (["--model", missing], None) if how == "flag" else ([], {"MODEL_PATH": missing})
    proc = run_cli(*command, *args, stdin='{"prompt": "hi"}\n', env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: model path does not exist: {missing}"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-i", "/nonexistent/in.jsonl"], "error: cannot open /nonexistent/in.jsonl"),
        (["chat", "--top-p", "0"], "error: top_p must be in (0, 1]"),
        (["generate", "-i", "-", "--temperature", "-1"], "error: temperature must be >= 0"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], message: str):
    proc = run_cli(*args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(message)


def test_generate_with_only_bad_lines_needs_no_model():
    proc = run_cli("generate", "-i", "-", "--model", "/nonexistent", stdin="[]\n\n{}\n")
    assert_clean(proc)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["index"], r["line"]) for r in records] == [(0, 1), (1, 3)]
    assert "0 ok, 2 failed" in proc.stderr


# ---------------------------------------------------------------- rules, against a stand-in engine


class WordTokenizer:
    """One token per word; a chat message costs its words plus 2 (role and end markers)."""

    def encode(self, text: str, **options: bool) -> list[int]:
        return [1] * len(text.split())

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return [1] * sum(len(m["content"].split()) + 2 for m in messages)


class StubLLM:
    def __init__(self, max_model_len: int = 100):
        self.max_model_len = max_model_len
        self.calls: list[tuple[str, list, list]] = []
        self.aborted = False

    def get_tokenizer(self) -> WordTokenizer:
        return WordTokenizer()

    def stream(self, prompt_token_ids: list[int], params: SamplingParams):
        try:
            yield StreamOutput("r0", [5], "Par")
            raise KeyboardInterrupt  # Ctrl-C arriving while the engine steps
        finally:
            self.aborted = True

    def generate(self, prompts: list, params: list, use_tqdm: bool = True) -> list[RequestOutput]:
        self.calls.append(("generate", prompts, params))
        return [self.output(p["prompt_token_ids"]) for p in prompts]

    def chat(self, conversations: list, params: list, use_tqdm: bool = True) -> list[RequestOutput]:
        self.calls.append(("chat", conversations, params))
        return [self.output(WordTokenizer().apply_chat_template(c)) for c in conversations]

    def output(self, prompt_ids: list[int]) -> RequestOutput:
        return RequestOutput("r", None, prompt_ids, [CompletionOutput(0, "ok", [7, 8], finish_reason="stop")])


def turn(words: int) -> list[dict]:
    return [{"role": "user", "content": "u " * words}, {"role": "assistant", "content": "a " * words}]


def test_chat_drops_oldest_turns_to_fit_max_length():
    session = ChatSession(StubLLM(), SamplingParams(), max_length=30, history=[*turn(4), *turn(4), *turn(4)])
    prompt_ids, history = session.build_prompt("one two three", limit=30)
    assert history == [*turn(4), *turn(4)]  # 2 turns of 12 tokens + a 5-token query < 30
    assert len(prompt_ids) == 29


def test_chat_message_that_cannot_fit_keeps_history(capsys):
    session = ChatSession(StubLLM(), SamplingParams(), max_length=10, history=turn(1))
    session.reply("far too many words in this one message")
    assert "message too long: 10 tokens, the limit is 10" in capsys.readouterr().out
    assert session.history == turn(1)


def test_chat_interrupt_aborts_and_keeps_partial_answer(capsys):
    llm = StubLLM()
    session = ChatSession(llm, SamplingParams(), max_length=50)
    session.reply("capital of France?")
    assert llm.aborted
    assert session.history[-1] == {"role": "assistant", "content": "Par"}
    assert "[interrupted]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "line, error",
    [
        ("{", "invalid JSON"),
        ('"text"', "expected a JSON object"),
        ("{}", "need exactly one of"),
        ('{"prompt": "a", "messages": []}', "need exactly one of"),
        ('{"prompt": 3}', "'prompt' must be a string"),
        ('{"messages": [{"role": "user"}]}', "'messages' must be"),
        ('{"prompt": "a", "max_token": 3}', "unknown field(s): max_token"),
        ('{"prompt": "a", "max_tokens": "3"}', "'max_tokens' must be of type int"),
        ('{"prompt": "a", "top_p": true}', "'top_p' must be of type number"),
        ('{"prompt": "a", "top_p": 0}', "top_p must be in (0, 1]"),
        ('{"prompt": "a", "stop": [1]}', "'stop' must be of type str_list"),
    ],
)
def test_parse_line_rejects(line: str, error: str):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_line(line, {})


def test_parse_line_merges_defaults_and_overrides():
    prompt, params = parse_line(
        '{"prompt": "hi", "top_p": 0.5, "stop": "\\n"}', {"temperature": 0, "top_p": 0.9}
    )
    assert prompt == "hi"
    assert (params.temperature, params.top_p, params.stop) == (0, 0.5, ["\n"])


def test_run_batch_is_one_call_per_kind_and_clamps_to_context():
    lines = [
        '{"prompt": "a b c", "max_tokens": 50}',
        '{"messages": [{"role": "user", "content": "hi"}]}',
        '{"prompt": "' + "w " * 20 + '"}',
        '{"prompt": "d e", "max_tokens": 3}',
        '{"prompt": ""}',
    ]
    items = read_items(lines, {})
    llm = StubLLM(max_model_len=20)
    run_batch(llm, items)
    assert [kind for kind, _, _ in llm.calls] == ["generate", "chat"]
    _, prompts, params = llm.calls[0]
    assert [len(p["prompt_token_ids"]) for p in prompts] == [3, 2]
    assert [p.max_tokens for p in params] == [17, 3]  # 50 clamped to the 17 tokens left
    assert items[2].error == "prompt too long: 20 tokens, the context limit is 20"
    assert items[4].error == "the prompt is empty"
    assert [item.result["index"] for item in items if item.result] == [0, 1, 3]


def test_chat_with_a_lora_adapter(tmp_path):
    from glmserve import LLM, SamplingParams
    from glmserve.devtools.random_lora import write_random_lora
    from glmserve.model_path import find_bundled_model

    adapter = write_random_lora(find_bundled_model(), tmp_path / "adapter", rank=8, std=0.3)
    question = "What is the capital of France?"
    proc = run_cli("chat", "--temperature", "0", "--max-length", "96", "--lora", str(adapter), stdin=f"{question}\nstop\n")
    assert_clean(proc)
    answer = proc.stdout.split("助手/Assistant:", 1)[1].split("用户/User:", 1)[0].strip()
    llm = LLM(find_bundled_model(), lora_modules={"a": adapter})
    params = SamplingParams(temperature=0, max_tokens=64)
    messages = [{"role": "user", "content": question}]
    expected = llm.with_lora("a").chat(messages, params)[0].outputs[0].text.strip()
    assert answer[:20] == expected[:20] and expected != llm.chat(messages, params)[0].outputs[0].text.strip()
    bad = run_cli("chat", "--lora", str(tmp_path / "missing"), stdin="stop\n")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "is not a folder" in bad.stderr
