"""The native CPU kernels: int4 / int8 weights times 8-bit activations (csrc/quant_linear.cpp), and
the fused small ops of a decode step (csrc/decode_ops.cpp: RMSNorm, SwiGLU, rotary, KV write, paged
decode attention), which the layers use on CPU wherever the library loads.

Built once per machine with torch.utils.cpp_extension into a cache (~/.cache/glmserve/kernels,
or $GLMSERVE_KERNEL_CACHE), keyed by the sources, torch's version and the compiler, and loaded as
torch ops (`torch.ops.glmserve.*`). `make install` builds them up front
(`python -m glmserve.engine.kernels.native`); otherwise the first model that needs them builds
them (tens of seconds, once). All ISA paths are compiled into one library and chosen at run time
from the CPU's features. Where there is no compiler, or the build fails, `load()` says so in one
log line and returns False: the engine then keeps PyTorch's kernels. GLMSERVE_NATIVE_KERNELS=0
turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("quant_linear.cpp", "quant_linear_ymm.inc", "decode_ops.cpp", "decode_stack.cpp")
ISA_NAMES = {1: "c++", 2: "avx2", 3: "avx-vnni", 4: "avx512-vnni"}  # the `isa` argument of the ops
CFLAGS = ["-O3", "-fopenmp", "-std=c++17", "-Wno-unused-function"]


def cache_dir() -> Path:
    root = os.environ.get("GLMSERVE_KERNEL_CACHE") or Path.home() / ".cache" / "glmserve" / "kernels"
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(f"{torch.__version__} {sys.version_info[:2]} {os.environ.get('CXX', 'c++')} {CFLAGS}".encode())
    return Path(root) / digest.hexdigest()[:16]


@functools.cache
def load() -> bool:
    """Build (once) and load the kernels; False, with one log line saying why, where they cannot be."""
    if os.environ.get("GLMSERVE_NATIVE_KERNELS", "1") == "0":
        return False
    if sys.platform != "linux" or sysconfig.get_platform().split("-")[-1] != "x86_64":
        return False  # the kernels are x86 intrinsics
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        logger.warning("native CPU kernels unavailable (no C++ compiler %r): using PyTorch's", compiler)
        return False
    try:
        _build_and_load(cache_dir())
    except Exception as error:  # a compiler or linker failure: the PyTorch kernels still work
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        logger.warning("native CPU kernels unavailable (build failed: %s): using PyTorch's", reason[:300])
        return False
    return True


def _build_and_load(directory: Path) -> None:
    from torch.utils import cpp_extension  # imports setuptools: only when building or loading

    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "glmserve_cpu_kernels.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        return
    logger.info("building the native CPU kernels (once per machine) in %s", directory)
    cpp_extension.load(
        name="glmserve_cpu_kernels",
        sources=[str(SOURCE_DIR / name) for name in SOURCES if name.endswith(".cpp")],
        extra_cflags=CFLAGS,
        extra_include_paths=[str(SOURCE_DIR)],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def has_decode_ops() -> bool:
    """Are the fused ops of a CPU decode step (csrc/decode_ops.cpp) loaded? Same build as the kernels."""
    return load()


def available_isas() -> list[int]:
    """The `isa` values this CPU runs (1: plain C++, 2: AVX2, 3: AVX-VNNI, 4: AVX-512 VNNI)."""
    return list(torch.ops.glmserve.cpu_isas()) if load() else []


def best_isa_name() -> str:
    isas = available_isas()
    return ISA_NAMES[isas[-1]] if isas else "none"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not load():
        sys.exit("native CPU kernels could not be built; glmserve will use PyTorch's")
    print(f"native CPU kernels ready in {cache_dir()} (best path here: {best_isa_name()})")
