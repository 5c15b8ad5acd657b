"""Developer tools run as modules: `python -m glmserve.devtools.<name>`.

PRESETS_DIR holds the real ChatGLM2/3, GLM-4 and Baichuan configs and tokenizer files (copied from
the official downloads; no weights), shipped as package data: the random checkpoints of
`random_checkpoint` and the tests' tokenizers come from there.
"""

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
