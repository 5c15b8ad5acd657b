"""`glmserve chat`: the terminal chat (streaming, history, `clear`, `stop`), or with --tools the
agent of cli/tool_chat.py."""

from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import typer

from glmserve.cli.common import (
    ActivationPrecision,
    ActivationPrecisionOption,
    Dtype,
    DtypeOption,
    MaxModelLenOption,
    ModelOption,
    QuantizationOption,
    load_llm,
    make_params,
)
from glmserve.engine.sampling_params import SamplingParams

USER_PROMPT = "\n用户/User: "
ASSISTANT_LABEL = "\n助手/Assistant: "
BANNER = (
    "glmserve chat: type a message; `clear` resets the history, `stop` or Ctrl-D exits, "
    "Ctrl-C interrupts an answer"
)


def enable_line_editing() -> None:
    """Arrow keys and history for input(); also makes it print its prompt on stdout, not stderr."""
    try:
        import readline  # noqa: F401
    except ImportError:  # not on Windows
        pass


@dataclass
class ChatSession:
    """A terminal conversation. The history is a list of user/assistant message pairs."""

    llm: Any
    params: SamplingParams
    max_length: int  # ChatGLM's meaning: prompt plus answer tokens
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def run(self) -> None:
        if sys.stdin.isatty():
            enable_line_editing()
        print(BANNER)
        while (query := self.read_query()) is not None and query != "stop":
            if query == "clear":
                self.clear()
            elif query:
                self.reply(query)

    def read_query(self) -> str | None:
        try:
            return input(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return None

    def clear(self) -> None:
        self.history = []
        if sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # ANSI: clear screen, cursor home
        print("对话历史已清空 / history cleared")

    def reply(self, query: str) -> None:
        limit = min(self.max_length, self.llm.max_model_len)
        prompt_ids, history = self.build_prompt(query, limit)
        if len(prompt_ids) >= limit:
            print(
                f"消息太长 / message too long: {len(prompt_ids)} tokens, the limit is {limit} (--max-length)"
            )
            return
        answer = self.stream_answer(prompt_ids, replace(self.params, max_tokens=limit - len(prompt_ids)))
        user_turn = {"role": "user", "content": query}
        self.history = [*history, user_turn, {"role": "assistant", "content": answer}]

    def build_prompt(self, query: str, limit: int) -> tuple[list[int], list[dict]]:
        """Prompt ids with as much recent history as fits below `limit`; drops the oldest turns first."""
        tokenizer = self.llm.get_tokenizer()
        history = self.history
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            messages = [*system, *history, {"role": "user", "content": query}]
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if len(prompt_ids) < limit or not history:
                return prompt_ids, history
            history = history[2:]

    def stream_answer(self, prompt_ids: list[int], params: SamplingParams) -> str:
        """Print the answer as it streams. Ctrl-C closes the stream, which aborts the request."""
        print(ASSISTANT_LABEL, end="", flush=True)
        pieces: list[str] = []
        finish_reason = None
        try:
            with closing(self.llm.stream(prompt_ids, params)) as outputs:
                for out in outputs:
                    print(out.text_delta, end="", flush=True)
                    pieces.append(out.text_delta)
                    finish_reason = out.finish_reason
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        except ValueError as e:  # the engine refused the request
            print(f"[error: {e}]", end="")
        print()
        if finish_reason == "length":
            print("[stopped at the length limit: raise --max-length for longer answers]")
        return "".join(pieces)


def chat(
    model: ModelOption = None,
    dtype: DtypeOption = Dtype.auto,
    max_model_len: MaxModelLenOption = None,
    quantization: QuantizationOption = None,
    activation_precision: ActivationPrecisionOption = ActivationPrecision.int8,
    lora: Annotated[
        str | None, typer.Option(help="Chat with this adapter on the model: a peft LoRA folder or a ChatGLM P-Tuning v2 folder", metavar="DIR")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for the whole conversation")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="0 is greedy [default: the model family's]", show_default=False)
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(help="Nucleus sampling mass [default: the model family's]", show_default=False),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=2, help="Prompt plus answer tokens per turn [default: the model family's]", show_default=False
        ),
    ] = None,
    tools: Annotated[
        bool,
        typer.Option(
            "--tools", help="Let a ChatGLM3 / GLM-4 model call the built-in tools (time, calculator, Python)"
        ),
    ] = False,
    allow_unsandboxed_code: Annotated[
        bool,
        typer.Option(
            "--allow-unsandboxed-code",
            help="With --tools: run the model's Python even where the sandbox cannot be built (unsealed)",
        ),
    ] = False,
) -> None:
    """Chat in the terminal. Answers stream as they are generated.

    Type `clear` to reset the history, `stop` or Ctrl-D to exit. Ctrl-C during an answer
    stops it (the partial answer stays in the history); Ctrl-C at the prompt exits.
    When the conversation outgrows --max-length, the oldest turns are dropped. Defaults come from
    the model family: ChatGLM's demos use 0.8 / 0.8 / 8192; other models sample only if their
    generation_config.json says so, else answer greedily (the bundled GGUF has none).
    """
    make_params(temperature=temperature or 0.0, top_p=top_p or 1.0)  # reject bad values before loading
    llm = load_llm(model, dtype, max_model_len, quantization, activation_precision, lora)
    defaults = llm.generation_defaults
    params = make_params(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k,
        repetition_penalty=defaults.repetition_penalty,
    )
    if tools:
        from glmserve.cli.tool_chat import run_tool_chat  # jupyter_client: only for --tools

        run_tool_chat(llm, params, system, max_length or defaults.max_length, allow_unsandboxed_code)
        return
    ChatSession(llm, params, max_length or defaults.max_length, system).run()
