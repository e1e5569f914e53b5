"""`fit()`: the largest batch (or context) that really runs, found by measurement.

The search starts at the planner's prediction and walks outward with doubling steps, then bisects
(`planner.search.largest_from`), so a good prediction costs a handful of runs instead of log2(range) blind halvings.
Every probe is a real run under the same monitor and the same (optionally emulated) capacity as `doctor`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from kvscope.doctor.execute import execute
from kvscope.errors import usage
from kvscope.monitor import Monitor
from kvscope.planner import search
from kvscope.planner.workload import Workload

DIMENSIONS = ("batch", "context")


@dataclass
class Probe:
    value: int
    status: str
    peak_allocated_bytes: int | None
    seconds: float


@dataclass
class FitResult:
    dimension: str
    predicted: int
    measured: int
    capacity_bytes: int
    probes: list[Probe] = field(default_factory=list)

    @property
    def error(self) -> float | None:
        return (self.predicted - self.measured) / self.measured if self.measured else None

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error, "runs": len(self.probes)}


def fit(loaded, w: Workload, *, dimension: str = "batch", policy: str = "full", gpu_memory: str | None = None,
        on_probe=None) -> FitResult:
    if dimension not in DIMENSIONS:
        raise usage(f"cannot fit {dimension!r}", expected=" or ".join(DIMENSIONS), fix="--dimension")
    model, spec = loaded.model, loaded.spec
    device = next(model.parameters()).device
    if device.type == "cuda":
        from kvscope.doctor.doctor import emulate_capacity

        capacity, _ = emulate_capacity(gpu_memory, device)
    else:
        if w.budget_tokens is None or policy != "full":
            raise usage("on a machine without CUDA only a KV budget can run out", expected="--runtime kvscope "
                        "--policy full --budget N (the largest batch or context that fits that budget)",
                        fix="--budget, or run on a GPU")
        capacity = 0
    if dimension == "batch":
        predicted = search.max_batch(spec, w, capacity) if capacity else w.batch
        hi = max(4 * predicted, 64)
    else:
        predicted = search.max_context(spec, w, capacity) if capacity else (w.budget_tokens - w.new_tokens + 1)
        hi = spec.max_position_embeddings - w.new_tokens
    probes: list[Probe] = []

    def ok(n: int) -> bool:
        monitor = Monitor(device=(device.index or 0) if device.type == "cuda" else None)
        with monitor:
            o = execute(model, spec, w.with_(**{dimension: n}), policy=policy, monitor=monitor)
        probes.append(Probe(n, o.status, o.peak_allocated_bytes, round(o.seconds, 2)))
        if on_probe:
            on_probe(probes[-1])
        return o.status == "ok"

    try:
        measured = search.largest_from(ok, max(1, predicted), 1, hi)
    finally:  # the emulated cap must not outlive the search, even when a probe fails unexpectedly
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return FitResult(dimension, predicted, max(0, measured), capacity, probes)
