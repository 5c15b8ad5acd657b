"""Text <-> token ids for one model, from a Hugging Face folder or a GGUF file.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a folder with tokenizer.json
    tok.encode("Hi <|im_start|>")                     # specials in user text stay plain text
    tok.encode("<|im_start|>user\\nHi", parse_special=True)   # raw prompts may write them
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # -> list[int]

Every tokenizer implements the `Tokenizer` protocol (tokenization/base.py): tokenizer.json and most
GGUF vocabularies through Hugging Face `tokenizers` (hf.py, gguf.py); ChatGLM2/3 and GLM-4 with
their own SentencePiece / tiktoken files, in a folder or a `chatglm` GGUF (glm.py, glm_gguf.py);
Baichuan's SentencePiece (baichuan.py). No torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from glmserve.tokenization.baichuan import is_baichuan_tokenizer_folder, load_baichuan_tokenizer
from glmserve.tokenization.base import Tokenizer
from glmserve.tokenization.gguf import load_gguf_tokenizer
from glmserve.tokenization.glm import is_glm_tokenizer_folder, load_glm_tokenizer
from glmserve.tokenization.hf import load_hf_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a `.gguf` file or of a model folder (see FOLDER_LOADERS)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if path.is_dir():
        for marker, load in FOLDER_LOADERS:
            if marker(path) if callable(marker) else (path / marker).is_file():
                return load(path)
        found = sorted(p.name for p in path.iterdir())
        wanted = [marker.__doc__ if callable(marker) else marker for marker, _ in FOLDER_LOADERS]
        raise ValueError(f"no supported tokenizer in {path}: it holds {found}, expected one of {wanted}")
    raise ValueError(f"cannot load a tokenizer from {path}: expected a .gguf file or a model folder")


# What a model folder holds (a file name, or a test of the folder) -> how to read its tokenizer;
# the first match wins. Formats with their own files (ChatGLM's SentencePiece tokenizer.model,
# GLM-4's tiktoken file) go in front.
FOLDER_LOADERS: list[tuple[str | Callable[[Path], bool], Callable[[Path], Tokenizer]]] = [
    (is_glm_tokenizer_folder, load_glm_tokenizer),
    (is_baichuan_tokenizer_folder, load_baichuan_tokenizer),
    ("tokenizer.json", load_hf_tokenizer),
]

