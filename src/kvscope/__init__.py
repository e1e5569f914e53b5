"""kvscope: find, explain and fix KV-cache out-of-memory errors and eviction slowdowns.

The public API is imported lazily so that `kvscope plan` never pays for importing torch or transformers.

>>> import kvscope
>>> plan = kvscope.plan("llama-3-8b", batch=8, context=8000, new_tokens=128, gpu="H100-80GB")
>>> plan.fits
True
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("kvscope.models", "load"),
    "ModelSpec": ("kvscope.models.spec", "ModelSpec"),
    "catalogue": ("kvscope.models.catalogue", "CATALOGUE"),
    "plan": ("kvscope.planner", "plan_model"),
    "Workload": ("kvscope.planner.workload", "Workload"),
    "KvscopeError": ("kvscope.errors", "KvscopeError"),
    "UsageError": ("kvscope.errors", "UsageError"),
    "DoesNotFit": ("kvscope.errors", "DoesNotFit"),
    "cache_keyword": ("kvscope._compat", "cache_keyword"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvscope' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
