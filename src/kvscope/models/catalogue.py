"""Llama 3 family shapes, as data: each entry is the published config.json's architecture values.

No weights can be downloaded here, so these shapes drive shape-only planning and random-weight GPU benchmarks.
Each entry names the config.json it was copied from (litgpt style); `from_name(name, **overrides)` derives variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvscope.errors import usage

_LLAMA3_VOCAB = 128256
_LLAMA3_COMMON = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": _LLAMA3_VOCAB,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
}
_SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128}
_SHAPE_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "head_dim": 128}


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    source: str
    config: dict[str, Any] = field(repr=False)


def _entry(name: str, repo: str, **values: Any) -> CatalogueEntry:
    return CatalogueEntry(name, f"https://huggingface.co/{repo}/blob/main/config.json", values)


CATALOGUE: dict[str, CatalogueEntry] = {
    e.name: e
    for e in [
        _entry("llama-3-8b", "meta-llama/Meta-Llama-3-8B", **_LLAMA3_COMMON, **_SHAPE_8B,
               max_position_embeddings=8192, tie_word_embeddings=False, eos_token_id=128001),
        _entry("llama-3-70b", "meta-llama/Meta-Llama-3-70B", **_LLAMA3_COMMON, **_SHAPE_70B,
               max_position_embeddings=8192, tie_word_embeddings=False, eos_token_id=128001),
        _entry("llama-3.1-8b", "meta-llama/Llama-3.1-8B", **_LLAMA3_COMMON, **_SHAPE_8B,
               max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0), tie_word_embeddings=False,
               eos_token_id=128001),
        _entry("llama-3.1-70b", "meta-llama/Llama-3.1-70B", **_LLAMA3_COMMON, **_SHAPE_70B,
               max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0), tie_word_embeddings=False,
               eos_token_id=128001),
        _entry("llama-3.1-405b", "meta-llama/Llama-3.1-405B", **_LLAMA3_COMMON, hidden_size=16384,
               intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
               head_dim=128, max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0),
               tie_word_embeddings=False, eos_token_id=128001),
        _entry("llama-3.2-1b", "meta-llama/Llama-3.2-1B", **_LLAMA3_COMMON, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               max_position_embeddings=131072, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True,
               eos_token_id=128001),
        _entry("llama-3.2-3b", "meta-llama/Llama-3.2-3B", **_LLAMA3_COMMON, hidden_size=3072, intermediate_size=8192,
               num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=131072, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True,
               eos_token_id=128001),
        _entry("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", **_LLAMA3_COMMON, **_SHAPE_70B,
               max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0), tie_word_embeddings=False,
               eos_token_id=[128001, 128008, 128009]),
        _entry("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", model_type="llama",
               architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152, hidden_act="silu",
               max_position_embeddings=8192, rms_norm_eps=1e-05, rope_theta=100000.0, tie_word_embeddings=True,
               attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    ]
}


def names() -> list[str]:
    return list(CATALOGUE)


def catalogue_entry(name: str) -> CatalogueEntry:
    key = name.strip().lower()
    if key not in CATALOGUE:
        raise usage(f"unknown model {name!r}", expected="a local model path or one of " + ", ".join(CATALOGUE),
                    fix="the MODEL argument")
    return CATALOGUE[key]


def is_catalogue_name(ref: str) -> bool:
    return ref.strip().lower() in CATALOGUE


def from_name(name: str, **overrides: Any) -> dict[str, Any]:
    """A config dict for a catalogue entry, with `overrides` applied (e.g. num_hidden_layers=2 for tests)."""
    return {**catalogue_entry(name).config, **overrides}
