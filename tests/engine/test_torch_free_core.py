"""The engine's bookkeeping (sequence, block manager, scheduler, sampling params, outputs, the
detokenizer protocol), the chat formats and the tokenizers import with torch made unimportable: they
stay plain Python, testable and usable without it (STYLE.md, habit 2)."""

import subprocess
import sys

TORCH_FREE = [
    "glmserve",
    "glmserve.engine.sequence",
    "glmserve.engine.block_manager",
    "glmserve.engine.scheduler",
    "glmserve.engine.sampling_params",
    "glmserve.engine.outputs",
    "glmserve.engine.detokenizer",
    "glmserve.chat.chatglm",
    "glmserve.chat.glm4",
    "glmserve.chat.baichuan",
    "glmserve.chat.defaults",
    "glmserve.chat.tool_parsers",
    "glmserve.tokenization",
    "glmserve.serving.protocol",
]
BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is unimportable in this test ({name})")
sys.meta_path.insert(0, NoTorch())
"""


def test_engine_core_imports_without_torch():
    code = BLOCK_TORCH + "".join(f"import {module}\n" for module in TORCH_FREE) + "print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_the_block_is_real():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import glmserve.engine.llm_engine"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "torch is unimportable" in done.stderr
