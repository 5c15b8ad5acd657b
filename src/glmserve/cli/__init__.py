"""The `glmserve` command: one typer app, one module per subcommand: serve (cli/serve.py), chat
(cli/chat.py), generate (cli/generate.py), estimate and quantize (here). The only layer that wires
the others together.

Every user error ends the process with one line on stderr and exit code 1, never a traceback.
Torch and the engine are imported only once a command loads a model, so `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glmserve.cli.chat import ChatSession, chat
from glmserve.cli.common import (
    Dtype,
    DtypeOption,
    MaxModelLenOption,
    ModelOption,
    Quantization,
    QuantizationOption,
    fail,
)
from glmserve.cli.generate import generate
from glmserve.cli.serve import serve
from glmserve.model_path import ModelNotFoundError, resolve_model_path

__all__ = ["ChatSession", "app", "main"]

app = typer.Typer(
    help="Serve, chat with and batch-run ChatGLM-family and Llama-family models.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click messages: usage errors stay short, no boxes
    pretty_exceptions_enable=False,
)
# serve: its flags come from ServeSettings (declared once: flag, env var, help); fastapi and torch
# are imported only inside it.
app.command()(serve)
app.command()(chat)
app.command()(generate)


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
