"""Ranked fixes for a workload that does not fit: each is re-planned, so every number comes from the same model.

The ranking is by what a fix costs the user, cheapest first: a different runtime changes nothing in the output;
a smaller batch costs throughput; fp8/int8 KV costs little quality; int4 and eviction cost more; a shorter context
changes the task; more or larger GPUs cost money.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvscope.models.spec import ModelSpec
from kvscope.planner import search
from kvscope.planner.estimate import estimate
from kvscope.planner.gpus import by_memory
from kvscope.planner.sizes import format_bytes
from kvscope.planner.workload import Workload


@dataclass(frozen=True)
class Fix:
    rank: int
    action: str
    option: str  # the CLI options that apply it
    needed_bytes: int  # peak + overhead before the fix
    available_bytes: int
    estimate_bytes: int  # peak + overhead after the fix
    fits: bool
    tradeoff: str
    changes: dict  # Workload fields (and "gpu", "policy") that the fix sets

    @property
    def message(self) -> str:
        return (
            f"{self.action}: needed {format_bytes(self.needed_bytes)}, available {format_bytes(self.available_bytes)}; "
            f"with {self.option} the estimate is {format_bytes(self.estimate_bytes)} "
            f"({'fits' if self.fits else 'still too large'}); {self.tradeoff}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


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
                             changes))

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
    from kvscope.policies.registry import preferred_for  # imports torch: only when a budget fix is considered

    n = search.max_budget(spec, w, capacity)
    if 1 <= n < w.kv_tokens:
        policy = preferred_for(n)
        add(f"cap the KV cache at {n} tokens per sequence with an eviction policy",
            f"--runtime kvscope --budget {n} --policy {policy}",
            w.with_(runtime="kvscope", budget_tokens=n, policy=policy, knobs=w.knobs if policy == w.policy else {}),
            f"keeps {n / w.kv_tokens:.0%} of the {w.kv_tokens} KV tokens; quality depends on the policy", policy=policy)
    c = search.max_context(spec, w, capacity)
    if 1 <= c < w.context:
        add(f"shorten the prompt to {c} tokens", f"--context {c}", w.with_(context=c),
            f"drops {w.context - c} tokens of history (truncate or summarize it)")
    for tp in (2, 4, 8):
        if tp > w.tp and spec.num_heads % tp == 0:
            before = len(fixes)
            add(f"split the model over {tp} GPUs (tensor parallel)", f"--tp {tp}", w.with_(tp=tp),
                f"{tp} GPUs of this size")
            if len(fixes) > before:
                break
    for g in by_memory():
        if g.memory_bytes > capacity:
            before = len(fixes)
            add(f"use a larger GPU: {g.name}", f"--gpu {g.name}", w, f"{format_bytes(g.memory_bytes)} GPU",
                cap=g.memory_bytes, gpu=g.name)
            if len(fixes) > before:
                break
    return fixes
