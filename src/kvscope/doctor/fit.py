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
from kvscope.planner.estimate import max_prompt
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
    """`measured` is the largest value that ran; when it is `ceiling` (the top of the search) the true largest may be
    higher, so no prediction error is given."""

    dimension: str
    predicted: int
    measured: int
    capacity_bytes: int
    ceiling: int
    probes: list[Probe] = field(default_factory=list)

    @property
    def ceiling_reached(self) -> bool:
        return self.measured >= self.ceiling

    @property
    def error(self) -> float | None:
        if not self.measured or self.ceiling_reached:
            return None
        return (self.predicted - self.measured) / self.measured

    def to_dict(self) -> dict:
        return {**asdict(self), "ceiling_reached": self.ceiling_reached, "error": self.error, "runs": len(self.probes)}


def fit(loaded, w: Workload, *, dimension: str = "batch", on_probe=None) -> FitResult:
    """Measure the largest `dimension` ("batch" or "context") of `w` that runs, in `w.gpu_memory` when it is given (an
    emulated smaller GPU). On the CPU only a KV budget can run out (`w.budget_tokens` with the `full` policy), and
    only the context: the budget is per sequence."""
    if dimension not in DIMENSIONS:
        raise usage(f"cannot fit {dimension!r}", expected=" or ".join(DIMENSIONS), fix="--dimension")
    from kvscope.doctor.doctor import emulate_capacity, with_policy

    w = with_policy(w)
    model, spec = loaded.model, loaded.spec
    device = next(model.parameters()).device
    if device.type == "cuda":
        capacity, _ = emulate_capacity(w.gpu_memory, device)
        predicted = (search.max_batch if dimension == "batch" else search.max_context)(spec, w, capacity)
    else:
        capacity, predicted = 0, _cpu_prediction(w, dimension)
    hi = max(4 * predicted, 64) if dimension == "batch" else max_prompt(spec, w.new_tokens)
    probes: list[Probe] = []

    def ok(n: int) -> bool:
        monitor = Monitor(device=(device.index or 0) if device.type == "cuda" else None)
        with monitor:
            o = execute(model, spec, w.with_(**{dimension: n}), monitor=monitor)
        probes.append(Probe(n, o.status, o.peak_allocated_bytes, round(o.seconds, 2)))
        if on_probe:
            on_probe(probes[-1])
        return o.status == "ok"

    try:
        measured = search.largest_from(ok, max(1, predicted), 1, hi)
    finally:  # the emulated cap must not outlive the search, even when a probe fails unexpectedly
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return FitResult(dimension, predicted, max(0, measured), capacity, hi, probes)


def _cpu_prediction(w: Workload, dimension: str) -> int:
    """The longest prompt a KV budget holds: prompt + new - 1 <= budget. Anything else has no answer on the CPU."""
    if w.budget_tokens is None or w.cache_policy != "full" or w.runtime != "kvscope":
        raise usage("on a machine without CUDA only a KV budget can run out", expected="--runtime kvscope "
                    "--policy full --budget N (the longest prompt that fits that budget)",
                    fix="--runtime, --policy and --budget, or run on a GPU")
    if dimension == "batch":
        raise usage("on a machine without CUDA only the KV budget can run out, and it holds tokens per sequence: "
                    "every batch size fits it, so there is no largest batch to find", expected="--dimension context",
                    fix="--dimension, or run on a GPU")
    predicted = w.budget_tokens - w.new_tokens + 1
    if predicted < 1:
        raise usage(f"a budget of {w.budget_tokens} KV tokens cannot hold {w.new_tokens} new tokens after even a "
                    f"1-token prompt (the cache holds prompt + new - 1 tokens)",
                    expected=f"--budget of at least {w.new_tokens}, or at most {w.budget_tokens} new tokens",
                    fix="--budget or --new-tokens")
    return predicted
