"""glmserve: private serving of ChatGLM-family chat models.

Public names are imported lazily, so `import glmserve.config` or `glmserve --help` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "LLM": "glmserve.llm",
    "SamplingParams": "glmserve.engine.sampling_params",
    "RequestOutput": "glmserve.engine.outputs",
    "CompletionOutput": "glmserve.engine.outputs",
    "StreamOutput": "glmserve.engine.outputs",
    "Tokenizer": "glmserve.tokenization",
    "load_tokenizer": "glmserve.tokenization",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glmserve' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
