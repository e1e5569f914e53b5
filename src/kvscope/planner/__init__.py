"""Planner: pure functions on ModelSpec + Workload -> Plan. Imports neither torch nor transformers."""

from __future__ import annotations

from kvscope.planner.estimate import Estimate, estimate
from kvscope.planner.gpus import GPUS, gpu
from kvscope.planner.plan import Plan, plan
from kvscope.planner.sizes import format_bytes, parse_size
from kvscope.planner.workload import Workload


def plan_model(model: str, *, gpu: str | None = None, gpu_memory: str | int | None = None, **workload) -> Plan:
    """Plan a catalogue model or a local model path (only its config is read).

    >>> plan_model("llama-3-8b", batch=8, context=8000, new_tokens=16, gpu="H100-80GB").fits
    True
    """
    from kvscope.models.loader import spec_for

    return plan(spec_for(model), Workload(**workload), gpu=gpu, gpu_memory=gpu_memory)


__all__ = ["GPUS", "Estimate", "Plan", "Workload", "estimate", "format_bytes", "gpu", "parse_size", "plan",
           "plan_model"]
