"""What the `glmserve` commands that load a model share: their options, one-line failures, the model.

Every user error ends the process with one line on stderr and exit code 1, never a traceback.
Torch and the engine are imported only once a command loads a model, so `--help` stays fast.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, NoReturn

import typer

from glmserve.engine.sampling_params import SamplingParams
from glmserve.model_path import ModelNotFoundError, resolve_model_path


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


class ActivationPrecision(str, Enum):
    int8 = "int8"
    float = "float"


ActivationPrecisionOption = Annotated[
    ActivationPrecision,
    typer.Option(
        help="int8: int4/int8 weights on CPU multiply activations quantized to 8 bits per block of 32 "
        "(native kernels, as llama.cpp; slightly different results); float: activations stay in --dtype",
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
    model: str | None,
    dtype: Dtype,
    max_model_len: int | None,
    quantization: Quantization | None = None,
    activation_precision: ActivationPrecision = ActivationPrecision.int8,
    lora: str | None = None,
) -> Any:
    """The model as an LLM; with `lora` (a peft adapter folder), a view running every call on it."""
    try:
        path = resolve_model_path(model)
    except ModelNotFoundError as e:
        fail(str(e))
    from glmserve import LLM  # imports torch: only once a model is really needed

    try:
        quant = quantization.value if quantization else None
        llm = LLM(model=str(path), dtype=dtype.value, max_model_len=max_model_len, quantization=quant,
                  activation_precision=activation_precision.value)  # fmt: skip
    except (ValueError, OSError, NotImplementedError) as e:
        fail(f"cannot load {path}: {e}")
    if lora is None:
        return llm
    try:
        llm.add_lora("adapter", lora)
    except ValueError as e:
        fail(f"cannot load the adapter: {e}")
    return llm.with_lora("adapter")
