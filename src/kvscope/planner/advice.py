"""Ranked fixes for a workload that does not fit: each is re-planned, so every number comes from the same model.

The ranking is by what a fix costs the user, cheapest first: a different runtime changes nothing in the output;
a smaller batch costs throughput; fp8/int8 KV costs little quality; int8/fp8 weights cost decode speed in torchao's
weight-only products (the weight is dequantized for each one) and a little quality; eviction costs more; int4 weights
cost the most quality of the quantizations; a shorter context changes the task; more or larger GPUs cost money.
Where decode speed was measured (kvscope.planner.measured), a weight format that decodes at less than half the dense
speed at the workload's batch costs more than eviction: it ranks after eviction and after int4, the slow formats
fastest first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvscope.models.spec import ModelSpec
from kvscope.planner import search
from kvscope.planner.estimate import estimate
from kvscope.planner.gpus import by_memory
from kvscope.planner.sizes import format_bytes
from kvscope.planner.workload import Workload


@dataclass(frozen=True)
class Fix:
    """One ranked fix, the planner's or the doctor's: the option that applies it, its estimate against what was needed
    and available, what it costs, and the workload it runs. `estimate_of` says what the estimate prices: the planner's
    needed bytes, or (a budget fix of the doctor's) the KV storage the fixed cache allocates, which its re-run
    measures. `applicable`: whether the doctor can run it on this machine (more or larger GPUs it cannot)."""

    rank: int
    action: str
    option: str  # the CLI options that apply it
    needed_bytes: int  # before the fix
    available_bytes: int
    estimate_bytes: int  # after the fix
    fits: bool
    tradeoff: str
    changes: dict  # Workload fields (and "gpu", "policy") that the fix sets
    workload: Workload | None = field(default=None, repr=False)  # the fixed workload
    estimate_of: str = "needed (peak allocated + overhead)"
    message: str = ""  # the sentence shown for it; by default the planner's
    applicable: bool = True
    command: str | None = None  # the command line that applies it, when the caller knows the command

    def __post_init__(self) -> None:
        if not self.message:
            object.__setattr__(self, "message", (
                f"{self.action}: needed {format_bytes(self.needed_bytes)}, available "
                f"{format_bytes(self.available_bytes)}; with {self.option} the estimate is "
                f"{format_bytes(self.estimate_bytes)} ({'fits' if self.fits else 'still too large'}); {self.tradeoff}"))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "action": self.action, "option": self.option, "needed_bytes": self.needed_bytes,
                "available_bytes": self.available_bytes, "estimate_bytes": self.estimate_bytes,
                "estimate_of": self.estimate_of, "fits": self.fits, "tradeoff": self.tradeoff,
                "changes": self.changes, "message": self.message, "applicable": self.applicable,
                "command": self.command}


def advise(spec: ModelSpec, w: Workload, capacity: int) -> list[Fix]:
    """Fixes that make `w` fit in `capacity`, cheapest first; empty when it already fits."""
    needed = estimate(spec, w, capacity).needed_bytes
    if needed <= capacity:
        return []
    fixes: list[Fix] = []

    def add(action: str, option: str, new: Workload, tradeoff: str, cap: int = capacity, **extra) -> None:
        est = estimate(spec, new, cap)
        if est.fits:
            changes = w.changes_to(new) | extra
            fixes.append(Fix(len(fixes) + 1, action, option, needed, capacity, est.needed_bytes, True, tradeoff,
                             changes, new))

    if w.runtime == "hf":
        add("use kvscope's runtime (chunked prefill into one preallocated cache)", "--runtime kvscope",
            w.with_(runtime="kvscope"), "same tokens out; prefill activations shrink to one chunk")
    b = search.max_batch(spec, w, capacity)
    if 1 <= b < w.batch:
        add(f"reduce the batch to {b}", f"--batch {b}", w.with_(batch=b),
            f"{w.batch - b} fewer sequences per step ({(w.batch - b) / w.batch:.0%} less throughput)")
    for kv, cost in (("fp8", "small quality cost"), ("int8", "perplexity within about 1%"),
                     ("int4", "perplexity within about 5%")):
        if kv != w.kv_dtype and spec.supports_kv_dtype(kv):
            add(f"store the KV cache as {kv}", f"--runtime kvscope --kv-dtype {kv}",
                w.with_(runtime="kvscope", kv_dtype=kv), f"{cost}; KV bytes per token "
                f"{spec.kv_bytes_per_token(w.kv_dtype, w.tp)} -> {spec.kv_bytes_per_token(kv, w.tp)}")
    slow = _slow_formats(w.batch)
    for fmt in ("int8", "fp8"):
        if fmt not in slow:
            _weights_fix(spec, w, fmt, add)
    from kvscope.policies.registry import preferred_for  # imports torch: only when a budget fix is considered

    n = search.max_budget(spec, w, capacity)
    if 1 <= n < w.kv_tokens:
        policy = preferred_for(n)
        add(f"cap the KV cache at {n} tokens per sequence with an eviction policy",
            f"--runtime kvscope --budget {n} --policy {policy}",
            w.with_(runtime="kvscope", budget_tokens=n, policy=policy, knobs=w.knobs if policy == w.policy else {}),
            f"keeps {n / w.kv_tokens:.0%} of the {w.kv_tokens} KV tokens; quality depends on the policy", policy=policy)
    for fmt in ([] if "int4" in slow else ["int4"]) + slow:
        _weights_fix(spec, w, fmt, add)
    c = search.max_context(spec, w, capacity)
    if 1 <= c < w.context:
        add(f"shorten the prompt to {c} tokens", f"--context {c}", w.with_(context=c),
            f"drops {w.context - c} tokens of history (truncate or summarize it)")
    for tp in (2, 4, 8) if w.weights is None else ():  # a weight format runs on one GPU's model only
        if tp > w.tp and spec.num_heads % tp == 0:
            before = len(fixes)
            add(f"split the model over {tp} GPUs (tensor parallel)", f"--tp {tp}", w.with_(tp=tp),
                f"{tp} GPUs of this size")
            if len(fixes) > before:
                break
    for g in by_memory():
        if g.memory_bytes > capacity:
            before = len(fixes)
            add(f"use a larger GPU: {g.name}", f"--gpu {g.name}", w.with_(gpu_memory=g.memory_bytes),
                f"{format_bytes(g.memory_bytes)} GPU",
                cap=g.memory_bytes, gpu=g.name)
            if len(fixes) > before:
                break
    return fixes


SLOW_DECODE = 0.5  # measured decode speed over dense below which a weight format ranks after eviction


def _slow_formats(batch: int) -> list[str]:
    """The weight formats measured to decode at less than SLOW_DECODE of dense at `batch`, fastest first."""
    from kvscope.planner import measured

    ratios = {f: measured.decode_ratio(f, batch) for f in ("int8", "fp8", "int4")}
    return sorted((f for f, r in ratios.items() if r is not None and r < SLOW_DECODE), key=lambda f: -ratios[f])


def weights_tradeoff(spec: ModelSpec, w: Workload, fmt: str) -> str:
    """What `--weights fmt` frees and buys, in numbers: weight bytes before and after, the KV tokens the freed memory
    holds, and the measured decode and prefill speed and perplexity change (kvscope.planner.measured; "not measured"
    if none)."""
    from kvscope.planner import measured

    before = spec.weights_bytes(w.dtype, w.tp, weights=w.weights)
    after = spec.weights_bytes(w.dtype, w.tp, weights=fmt)
    freed = before - after
    tokens = freed // spec.kv_bytes_per_token(w.kv_dtype, w.tp)
    return (f"frees {format_bytes(freed)} of weight memory (weights {format_bytes(before)} -> {format_bytes(after)}), "
            f"not KV: that memory holds {tokens:,} more {w.kv_dtype} KV tokens; {measured.decode_change(fmt)}; "
            f"{measured.prefill_change(fmt)}; {measured.perplexity_change(fmt)}")


def _weights_fix(spec: ModelSpec, w: Workload, fmt: str, add) -> None:
    """Offer `--weights fmt` for dense weights, where the format can hold this model in this dtype."""
    from kvscope.errors import UsageError
    from kvscope.weightformats import check_format, weight_format

    if w.weights is not None or w.tp != 1:
        return
    try:
        check_format(weight_format(fmt), w.dtype, spec.linears(), spec.name)
    except UsageError:
        return
    add(f"quantize the weights to {fmt} ({weight_format(fmt).description})", f"--weights {fmt}",
        w.with_(weights=fmt), weights_tradeoff(spec, w, fmt))
