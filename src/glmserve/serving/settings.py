"""Server settings, declared once: each field gives its CLI flag (`--max-queue`), its environment
variable (`GLMSERVE_MAX_QUEUE`) and its help text (see serving/cli.py)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from glmserve.config import EngineConfig

ENV_PREFIX = "GLMSERVE_"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Paths the app serves itself; a model of that name would shadow them on its classic route.
RESERVED_NAMES = {"health", "metrics", "v1", "docs", "redoc", "openapi.json", "ui"}
_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: list[str] = Field(
        default_factory=list,
        description="Model to serve as [NAME=]PATH (a .gguf file or a Hugging Face folder); repeatable. "
        "NAME defaults to the file or folder stem; the first model also answers POST / and /chatglm. "
        "Default: $MODEL_PATH, else the bundled SmolLM2",
        json_schema_extra={"short": "-m", "metavar": "[NAME=]PATH"},
    )
    lora: list[str] = Field(
        default_factory=list,
        description="LoRA adapter (a peft folder) to serve as [BASE:]NAME=DIR or DIR, on the model named BASE "
        "(default: the first); requests choose it with model=NAME; repeatable",
        json_schema_extra={"metavar": "[BASE:]NAME=DIR"},
    )
    max_loras: int = Field(
        EngineConfig.max_loras, ge=1,
        description="LoRA adapters resident per model at once (the most one batch mixes); others load on demand",
    )
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind")
    api_key: list[str] = Field(
        default_factory=list,
        description="Accepted API key (Authorization: Bearer KEY); repeatable. "
        "None given: no auth, allowed only on a loopback host unless --allow-no-auth",
        json_schema_extra={"metavar": "KEY"},
    )
    admin_key: list[str] = Field(
        default_factory=list,
        description="API key that may also load and unload adapters (/v1/load_lora_adapter); repeatable. "
        "With no keys at all, those routes are open on a loopback host only",
        json_schema_extra={"metavar": "KEY"},
    )
    allow_no_auth: bool = Field(False, description="Serve a non-loopback address without API keys")
    max_queue: int = Field(
        256, ge=1, description="Unfinished requests per model before new ones get 429 with Retry-After"
    )
    cors_origin: list[str] = Field(
        default_factory=list,
        description="Origin allowed by CORS, e.g. http://localhost:3000 or *; repeatable",
        json_schema_extra={"metavar": "ORIGIN"},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto: from the checkpoint"
    )
    quantization: Literal["none", "int8", "int4"] | None = Field(
        None,
        description="Weight-only quantization of linear layers [default: as in the checkpoint; "
        "a GGUF's 4-bit and Q8_0 weights stay so]",
    )
    quantization_group_size: int = Field(
        EngineConfig.quantization_group_size, ge=16, description="int4 group size (input columns per scale)"
    )
    activation_precision: Literal["int8", "float"] = Field(
        "int8",
        description="int8: int4/int8 weights on CPU multiply activations quantized to 8 bits per block of 32 "
        "(native kernels, as llama.cpp; slightly different results); float: activations stay in --dtype",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context limit in tokens [default: from the model]"
    )
    max_num_seqs: int = Field(
        EngineConfig.max_num_seqs, ge=1, description="Sequences decoded together per step"
    )
    kv_cache_memory: float = Field(
        EngineConfig.kv_cache_memory,
        gt=0,
        description="KV cache per model: a fraction of free memory (<= 1) or a size (134217728, 512MiB, 2GiB)",
        json_schema_extra={"metavar": "FRACTION|SIZE"},
    )
    num_threads: int | None = Field(
        None, ge=1, description="Torch threads per engine [default: physical cores]"
    )
    no_ui: bool = Field(False, description="Do not serve the web UI at /ui (then gradio is never imported)")
    allow_unsandboxed_code: bool = Field(
        False,
        description="Offer the UI's Code Interpreter even where its sandbox (bubblewrap namespaces) "
        "cannot be built: model-written code then runs unsealed, with limits only",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    graceful_timeout_s: float = Field(
        60.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before closing them"
    )

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            raise ValueError("expected a fraction like 0.25 or a size like 134217728, 512MiB, 2GiB")
        return float(match.group(1)) * _SIZE_UNITS[unit]

    @field_validator("model", "lora")
    @classmethod
    def _check_specs(cls, specs: list[str], info: ValidationInfo) -> list[str]:
        parse = parse_model_spec if info.field_name == "model" else parse_lora_spec
        for spec in specs:
            parse(spec)
        return specs

    @property
    def all_keys(self) -> list[str]:
        """Keys that may use the API: admin keys are API keys too."""
        return [*self.api_key, *self.admin_key]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            dtype=self.dtype,
            quantization=self.quantization,
            quantization_group_size=self.quantization_group_size,
            activation_precision=self.activation_precision,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            kv_cache_memory=self.kv_cache_memory,
            num_threads=self.num_threads,
            max_loras=self.max_loras,
        )

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address with no key unless the user said so."""
        if self.all_keys or self.allow_no_auth or is_loopback(self.host):
            return
        raise ValueError(
            f"binding {self.host} without an API key would let anyone on the network use the models: "
            "pass --api-key KEY (or GLMSERVE_API_KEY), or --allow-no-auth"
        )

    @property
    def may_run_code(self) -> bool:
        """The UI's Tool / Code Interpreter tabs run code on this machine: only for users who hold
        a key, or on loopback; never for anyone on the network (--allow-no-auth)."""
        return bool(self.all_keys) or is_loopback(self.host)


@dataclass(frozen=True)
class ModelSpec:
    name: str | None  # None: named after the path's stem once resolved
    path: str | None  # None: $MODEL_PATH or the bundled model


def parse_model_spec(spec: str) -> ModelSpec:
    """`NAME=PATH` or `PATH`. A `=` inside a path (a folder named `a=b/`) is not a name."""
    name, sep, path = spec.partition("=")
    if sep and MODEL_NAME_PATTERN.fullmatch(name):
        check_model_name(name)
        return ModelSpec(name, path)
    if not spec:
        raise ValueError("empty --model value")
    return ModelSpec(None, spec)


@dataclass(frozen=True)
class LoRASpec:
    base: str | None  # None: the first model
    name: str | None  # None: the folder's name
    path: str


def parse_lora_spec(spec: str) -> LoRASpec:
    """`BASE:NAME=DIR`, `NAME=DIR` or `DIR`."""
    left, sep, path = spec.partition("=")
    if not sep:
        if not spec:
            raise ValueError("empty --lora value")
        return LoRASpec(None, None, spec)
    base, colon, name = left.rpartition(":")
    if not path:
        raise ValueError(f"--lora {spec!r} names no adapter folder after '='")
    check_model_name(name)
    if colon:
        check_model_name(base)
    return LoRASpec(base if colon else None, name, path)


def check_model_name(name: str) -> str:
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    if name in RESERVED_NAMES:
        raise ValueError(f"model name {name!r} is reserved for the server's own routes: give it another name")
    return name


def default_model_name(path: Path) -> str:
    """The file or folder stem, with characters unsafe in a URL path replaced."""
    stem = path.stem if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".-_") or "model"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False
