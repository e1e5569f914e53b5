"""`Plan`: everything the planner says about one workload on one GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvscope.errors import usage
from kvscope.models.spec import ModelSpec
from kvscope.planner import memory, search
from kvscope.planner.advice import Fix, advise
from kvscope.planner.estimate import estimate
from kvscope.planner.gpus import gpu as lookup_gpu
from kvscope.planner.sizes import format_bytes, parse_size
from kvscope.planner.workload import Workload

DEFAULT_GPU = "H100-80GB"


@dataclass(frozen=True)
class Plan:
    model: str
    workload: Workload
    gpu: str
    capacity_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int
    activation_bytes: int
    logits_bytes: int
    workspace_bytes: int
    peak_phase: str
    peak_bytes: int
    overhead_bytes: int
    fits: bool
    max_batch: int
    max_context: int
    advice: list[Fix] = field(default_factory=list)
    host_bytes: int = 0  # host memory the recall tier can take (0 without recall)
    phases: list[dict] = field(default_factory=list)

    @property
    def needed_bytes(self) -> int:
        return self.peak_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "workload": self.workload.to_dict(),
            "gpu": self.gpu,
            "capacity_bytes": self.capacity_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes": self.kv_bytes,
            "activation_bytes": self.activation_bytes,
            "logits_bytes": self.logits_bytes,
            "workspace_bytes": self.workspace_bytes,
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "overhead_bytes": self.overhead_bytes,
            "needed_bytes": self.needed_bytes,
            "fits": self.fits,
            "max_batch": self.max_batch,
            "max_context": self.max_context,
            "host_bytes": self.host_bytes,
            "advice": [f.to_dict() for f in self.advice],
            "phases": self.phases,
        }


def capacity_of(gpu: str | None = None, gpu_memory: str | int | None = None) -> tuple[str, int]:
    """(label, bytes) of the target: a catalogue GPU or an explicit size; both at once is a usage error."""
    if gpu and gpu_memory is not None:
        raise usage("both --gpu and --gpu-memory were given", expected="one of them", fix="--gpu or --gpu-memory")
    if gpu_memory is not None:
        size = parse_size(gpu_memory)
        return format_bytes(size), size
    g = lookup_gpu(gpu or DEFAULT_GPU)
    return g.name, g.memory_bytes


def plan(spec: ModelSpec, w: Workload, *, gpu: str | None = None, gpu_memory: str | int | None = None,
         advice: bool = True) -> Plan:
    """Predict memory for `w` on one GPU (per GPU under tensor parallelism) and say what fits.

    >>> from kvscope.models.spec import ModelSpec
    >>> p = plan(ModelSpec.from_catalogue("llama-3-8b"), Workload(batch=1, context=4096, new_tokens=128))
    >>> p.fits, p.kv_bytes_per_token
    (True, 131072)
    """
    label, capacity = capacity_of(gpu, gpu_memory if gpu_memory is not None else w.gpu_memory)
    est = estimate(spec, w, capacity)
    peak = est.peak
    return Plan(
        model=spec.name,
        workload=w,
        gpu=label,
        capacity_bytes=capacity,
        weights_bytes=peak.weights,
        kv_bytes_per_token=spec.kv_bytes_per_token(w.kv_dtype, w.tp),
        kv_bytes=peak.kv,
        activation_bytes=peak.activations,
        logits_bytes=peak.logits,
        workspace_bytes=peak.workspace,
        peak_phase=peak.name,
        peak_bytes=est.peak_bytes,
        overhead_bytes=est.overhead_bytes,
        fits=est.fits,
        max_batch=search.max_batch(spec, w, capacity),
        max_context=search.max_context(spec, w, capacity),
        host_bytes=memory.recall_host_bytes(spec, w),
        advice=advise(spec, w, capacity) if advice else [],
        phases=[p.to_dict() for p in est.phases],
    )
