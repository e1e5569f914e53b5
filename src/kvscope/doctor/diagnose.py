"""From what happened to what it means: attribution of memory, the diagnosis, and ranked fixes with numbers."""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.doctor.execute import Outcome
from kvscope.planner.sizes import format_bytes as fb
from kvscope.planner.workload import Workload
from kvscope.policies import preferred_for

FRAGMENTATION_SHARE = 0.05  # reserved-but-unallocated above this share of capacity is worth a fix of its own


@dataclass
class Fix:
    rank: int
    option: str
    change: str
    peak_bytes: int | None
    fits: bool
    message: str
    workload: Workload | None  # the workload to re-run, None when it cannot be applied on this machine
    policy: str | None = None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "option": self.option, "change": self.change, "peak_bytes": self.peak_bytes,
                "fits": self.fits, "message": self.message, "applicable": self.workload is not None}


def attribution(o: Outcome, weights: int, capacity: int) -> dict[str, int]:
    """Split memory at the failure (or at the peak) into weights / KV cache / activations / other / fragmentation."""
    if o.at_failure is not None:
        f = o.at_failure
        allocated, reserved, used, kv = f.allocated, f.reserved, f.device_used, f.kv_bytes
    elif o.peak_allocated_bytes is not None:
        allocated, reserved, used, kv = o.peak_allocated_bytes, o.peak_reserved_bytes, None, o.kv_bytes
    else:  # CPU: process memory
        return {"weights": weights, "kv_cache": o.kv_bytes, "activations": 0,
                "other": max(0, o.peak_rss_bytes - weights - o.kv_bytes), "fragmentation": 0}
    return {"weights": weights, "kv_cache": kv, "activations": max(0, allocated - weights - kv),
            "other": max(0, (used or reserved) - reserved), "fragmentation": max(0, reserved - allocated)}


def diagnose(o: Outcome, w: Workload, prediction: dict, parts: dict[str, int], capacity: int, *,
             policy: str, kv_bytes_per_token_layer: int | None = None, layers: int = 1) -> dict:
    predicted = prediction["peak_bytes"] + prediction["overhead_bytes"]
    if o.status == "oom":
        f = o.at_failure
        needed = f.allocated + (f.tried_to_allocate or 0) + parts["other"]
        biggest = max(("weights", "kv_cache", "activations"), key=lambda k: parts[k])
        frag = parts["fragmentation"] > FRAGMENTATION_SHARE * capacity
        text = (f"At the failure PyTorch held {fb(f.allocated)}: weights {fb(parts['weights'])}, KV cache "
                f"{fb(parts['kv_cache'])}, activations and temporaries {fb(parts['activations'])}; it asked for "
                f"{fb(f.tried_to_allocate or 0)} more. The largest part was {biggest.replace('_', ' ')}. "
                f"Reserved but unallocated (fragmentation): {fb(parts['fragmentation'])}. The planner predicted "
                f"{fb(predicted)} needed against {fb(capacity)} ({'fits' if prediction['fits'] else 'does not fit'}).")
        if frag:
            text += (" Fragmentation is large: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True so freed blocks "
                     "can be reused for larger requests.")
        return {"headline": f"Out of GPU memory: needed about {fb(needed)}, available {fb(capacity)}",
                "explanation": text, "needed_bytes": needed, "available_bytes": capacity, "estimate_bytes": predicted,
                "option": None, "recommend_expandable_segments": frag}
    if o.status == "kv_budget_exceeded":
        need_tokens = w.total_tokens - 1
        per = (kv_bytes_per_token_layer or 0) * layers * w.batch
        return {"headline": f"KV budget exceeded: the sequence needs {need_tokens} tokens per layer, the budget holds "
                            f"{w.budget_tokens}",
                "explanation": f"Policy '{policy}' never evicts, so the cache must hold the whole sequence "
                               f"({w.context} prompt + {w.new_tokens} new tokens). "
                               f"Needed {fb(need_tokens * per)} of KV, "
                               f"available {fb((w.budget_tokens or 0) * per)} (the budget).",
                "needed_bytes": need_tokens * per, "available_bytes": (w.budget_tokens or 0) * per,
                "estimate_bytes": need_tokens * per, "option": "--budget or --policy",
                "recommend_expandable_segments": False}
    if o.status == "error":
        return {"headline": "The run failed", "explanation": o.error or "", "needed_bytes": None,
                "available_bytes": capacity, "estimate_bytes": predicted, "option": None,
                "recommend_expandable_segments": False}
    measured = o.peak_allocated_bytes
    if measured is None:
        return {"headline": f"Completed on the CPU: peak process memory {fb(o.peak_rss_bytes)}, KV cache "
                            f"{fb(o.kv_bytes)}",
                "explanation": "No CUDA device: the doctor measured process memory (RSS) and the KV budget instead "
                               f"of GPU memory. The planner's GPU estimate for this workload is {fb(predicted)}.",
                "needed_bytes": o.peak_rss_bytes, "available_bytes": capacity, "estimate_bytes": predicted,
                "option": None, "recommend_expandable_segments": False}
    err = (prediction["peak_bytes"] - measured) / measured if measured else 0.0
    return {"headline": f"Completed: peak {fb(measured)} allocated of {fb(capacity)} "
                        f"({(capacity - measured) / capacity:.0%} headroom)",
            "explanation": f"The planner predicted a peak of {fb(prediction['peak_bytes'])} ({err:+.1%} against the "
                           "measurement).",
            "needed_bytes": measured, "available_bytes": capacity, "estimate_bytes": prediction["peak_bytes"],
            "option": None, "recommend_expandable_segments": False}


def fixes_from_plan(prediction: dict, w: Workload, cuda: bool) -> list[Fix]:
    """The planner's ranked advice, with the workload each fix would run (None if this machine cannot run it)."""
    out = []
    for a in prediction.get("advice", []):
        changes = dict(a["changes"])
        runnable = "gpu" not in changes and changes.get("tp", 1) == 1 and cuda
        policy = preferred_for(changes["budget_tokens"]) if "budget_tokens" in changes else None
        fields = {k: v for k, v in changes.items() if k in Workload.__dataclass_fields__}
        out.append(Fix(len(out) + 1, a["option"], a["action"], a["estimate_bytes"], a["fits"], a["message"],
                       w.with_(**fields) if runnable else None, policy))
    return out


def fixes_for_budget(w: Workload, policy: str, per_token: dict[str, int], dense: str) -> list[Fix]:
    """Fixes for a KV budget that a non-evicting policy outgrew, cheapest in quality first. `per_token` maps KV
    format -> bytes per token (all layers, one sequence)."""
    need = w.total_tokens - 1
    budget = w.budget_tokens or 0
    budget_bytes = budget * per_token[w.kv_dtype or dense] * w.batch
    out: list[Fix] = []
    for kv, cost in (("int8", "perplexity within about 1%"), ("int4", "perplexity within about 5%")):
        held = budget_bytes // (per_token[kv] * w.batch)
        if held >= need and kv != w.kv_dtype:
            out.append(Fix(len(out) + 1, f"--kv-dtype {kv} --budget {held}", f"store the KV cache as {kv}",
                           budget_bytes, True, f"the same {fb(budget_bytes)} holds {held} tokens as {kv} "
                           f"(needed {need}); {cost}, nothing evicted", w.with_(kv_dtype=kv, budget_tokens=held),
                           policy))
    evict = preferred_for(budget)
    out.append(Fix(len(out) + 1, f"--policy {evict} --budget {budget}", f"evict with {evict} at the same budget",
                   budget_bytes, True, f"keeps {budget} of {need} tokens ({budget / need:.0%}) in "
                   f"{fb(budget_bytes)}; quality depends on the policy (see docs/benchmarks.md)", w, evict))
    more = need * per_token[w.kv_dtype or dense] * w.batch
    out.append(Fix(len(out) + 1, f"--budget {need}", "raise the budget to the whole sequence", more, True,
                   f"needs {fb(more)} of KV instead of {fb(budget_bytes)}; nothing evicted",
                   w.with_(budget_tokens=need), policy))
    return out
