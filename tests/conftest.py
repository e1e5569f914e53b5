"""Shared fixtures: tiny random Llama configs (no downloads) and the embedded SmolLM2 where real behaviour matters.

GPU tests are opt-in: `pytest --gpu` runs the tests marked `gpu`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False, help="run tests that need a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="GPU test: opt in with --gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_deterministic():
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from kvscope import _compat

    _compat.quiet_transformers()


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY)


def build_tiny(config: dict | None = None, seed: int = 0, dtype=torch.float32):
    from kvscope import _compat

    return _compat.build_random_model(config or TINY, dtype, "cpu", seed=seed)


@pytest.fixture
def tiny_model():
    return build_tiny()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A local HF model directory (config.json + model.safetensors) of the tiny random Llama."""
    model = build_tiny()
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (converted once per machine, then cached): (model, tokenizer, spec)."""
    from kvscope.models import load

    return load("smollm2-135m", dtype="fp32", device="cpu")


def write_config(directory: Path, values: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(values))
    return directory
