"""The `glmserve` command: one typer app, one function per subcommand (serve, chat, generate, estimate,
quantize); the requests of `generate` are checked and run in batch.py.

Every user error ends the process with one line on stderr and exit code 1, never a traceback.
Torch and the engine are imported only once a command loads a model, so `--help` stays fast.
"""

from __future__ import annotations

import json
import sys
from contextlib import closing
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO

import typer

from glmserve.cli.generate import BatchItem, read_items, run_batch
from glmserve.cli.serve import serve
from glmserve.engine.sampling_params import SamplingParams
from glmserve.model_path import ModelNotFoundError, resolve_model_path

app = typer.Typer(
    help="Serve, chat with and batch-run ChatGLM-family and Llama-family models.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click messages: usage errors stay short, no boxes
    pretty_exceptions_enable=False,
)


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Options shared by every command that loads a model.
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face checkpoint folder or .gguf file [default: $MODEL_PATH, else the bundled SmolLM2]",
        show_default=False,
    ),
]
DtypeOption = Annotated[Dtype, typer.Option(help="Weight and activation dtype; auto: from the checkpoint")]
MaxModelLenOption = Annotated[
    int | None,
    typer.Option(min=1, help="Context limit in tokens [default: from the model]", show_default=False),
]


class Quantization(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


QuantizationOption = Annotated[
    Quantization | None,
    typer.Option(
        help="Weight-only quantization of linear layers [default: as in the checkpoint; "
        "a GGUF's 4-bit and Q8_0 weights stay so]",
        show_default=False,
    ),
]


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def make_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        fail(str(e))


def load_llm(
    model: str | None, dtype: Dtype, max_model_len: int | None, quantization: Quantization | None = None
) -> Any:
    try:
        path = resolve_model_path(model)
    except ModelNotFoundError as e:
        fail(str(e))
    from glmserve import LLM  # imports torch: only once a model is really needed

    try:
        quant = quantization.value if quantization else None
        return LLM(model=str(path), dtype=dtype.value, max_model_len=max_model_len, quantization=quant)
    except (ValueError, OSError, NotImplementedError) as e:
        fail(f"cannot load {path}: {e}")


# ---------------------------------------------------------------- chat

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


@app.command()
def chat(
    model: ModelOption = None,
    dtype: DtypeOption = Dtype.auto,
    max_model_len: MaxModelLenOption = None,
    quantization: QuantizationOption = None,
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
    llm = load_llm(model, dtype, max_model_len, quantization)
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


# ---------------------------------------------------------------- generate


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


@app.command()
def generate(
    input_path: Annotated[str, typer.Option("--input", "-i", help="JSONL requests, `-` for stdin")],
    output_path: Annotated[str, typer.Option("--output", "-o", help="JSONL results, `-` for stdout")] = "-",
    model: ModelOption = None,
    dtype: DtypeOption = Dtype.auto,
    max_model_len: MaxModelLenOption = None,
    quantization: QuantizationOption = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Default 256", show_default=False)] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Default 1.0; 0 is greedy", show_default=False)
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Default 1.0", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed for every line", show_default=False)] = None,
) -> None:
    """Run a JSONL file of requests as one batch, with a progress bar.

    Each line is {"prompt": "..."} or {"messages": [...]}, optionally with max_tokens,
    temperature, top_p, stop, seed. Each writes one line, in order: {"index", "text",
    "finish_reason", "prompt_tokens", "completion_tokens"}, or {"index", "line", "error"}.
    """
    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    defaults = {name: value for name, value in given.items() if value is not None}
    make_params(**defaults)
    items = read_items(read_lines(input_path), defaults)
    sink = open_stream(output_path, "w")
    if any(not item.error for item in items):
        llm = load_llm(model, dtype, max_model_len, quantization)
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


# ---------------------------------------------------------------- estimate


@app.command()
def estimate(
    model: ModelOption = None,
    dtype: DtypeOption = Dtype.auto,
    max_model_len: MaxModelLenOption = None,
    quantization: QuantizationOption = None,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Concurrent sequences the KV cache serves")] = 64,
) -> None:
    """Memory for weights and KV cache, from the checkpoint's config alone (no weights loaded)."""
    try:
        path = resolve_model_path(model)
    except ModelNotFoundError as e:
        fail(str(e))
    from glmserve.config import EngineConfig
    from glmserve.engine.checkpoint import open_checkpoint
    from glmserve.engine.device import Placement
    from glmserve.engine.llm_engine import resolve_max_model_len
    from glmserve.engine.memory import estimate_memory

    config = EngineConfig(
        dtype=dtype.value,
        quantization=quantization.value if quantization else None,
        max_num_seqs=max_num_seqs,
    )
    try:
        checkpoint = open_checkpoint(path)
        limit = resolve_max_model_len(checkpoint.config, max_model_len)
        result = estimate_memory(checkpoint, config, limit, Placement.resolve(config))
    except (ValueError, OSError) as e:
        fail(f"cannot read {path}: {e}")
    typer.echo(f"model: {path}")
    for line in result.lines():
        typer.echo(line)


# serve: declared in serving/cli.py (settings declared once: flag, env var, help); fastapi and
# torch are imported only inside it.
app.command()(serve)


# ---------------------------------------------------------------- quantize


@app.command()
def quantize(
    output: Annotated[
        str, typer.Option("--output", "-o", help="Folder to write the quantized checkpoint to")
    ],
    quantization: Annotated[
        Quantization, typer.Option(help="int4 (group-wise) or int8 (per channel)")
    ] = Quantization.int4,
    model: ModelOption = None,
    group_size: Annotated[int, typer.Option(min=16, help="int4 group size (input columns per scale)")] = 64,
) -> None:
    """Write a pre-quantized copy of a Hugging Face checkpoint (safetensors + a small JSON), which
    then loads with --model like any folder, without quantizing again."""
    if quantization is Quantization.none:
        fail("--quantization must be int4 or int8")
    try:
        path = resolve_model_path(model)
    except ModelNotFoundError as e:
        fail(str(e))
    import torch

    from glmserve.engine.checkpoint import open_checkpoint
    from glmserve.engine.checkpoint.quantized import write_quantized

    try:
        size = write_quantized(
            open_checkpoint(path), Path(output), quantization.value, group_size, torch.bfloat16
        )
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {output} ({size / 2**30:.2f} GiB of weights, {quantization.value})")


def main() -> None:
    app(prog_name="glmserve")
