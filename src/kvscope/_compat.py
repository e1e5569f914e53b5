"""Every touch of `transformers` internals lives here.

The cache and model APIs moved between 5.x releases (we support 5.17 through 5.23); keeping the touches in one module
means a new release breaks one file, and tests of this module tell which.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advisory warnings (kvscope shows its own progress)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def llama_config(values: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**values)


def build_random_model(config_values: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
                       attn_implementation: str = "sdpa", seed: int = 0):
    """A `LlamaForCausalLM` with random weights, built directly on `device` in `dtype` (no CPU copy, no fp32 pass)."""
    from transformers import LlamaForCausalLM

    config = llama_config(config_values)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def from_pretrained(path: str, dtype: torch.dtype, device: str | torch.device, attn_implementation: str = "sdpa",
                    gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def config_from_gguf(path: str):
    from transformers import AutoConfig

    directory, name = os.path.split(path)
    return AutoConfig.from_pretrained(directory or ".", gguf_file=name)


def tokenizer_from_pretrained(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(path, **kwargs)


def save_dequantized(model, tokenizer, directory: str) -> None:
    """Write a GGUF-loaded model as safetensors + config (transformers refuses `save_pretrained` on GGUF models)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (`model.model.layers` for Llama)."""
    return list(base_model(model).layers)


def base_model(model):
    return model.model if hasattr(model, "model") else model


def attention_implementation(model) -> str:
    return str(getattr(model.config, "_attn_implementation", "sdpa") or "sdpa")
