"""From what happened to what it means: attribution of memory, the diagnosis, and ranked fixes with numbers.

One count of tokens everywhere: a sequence needs `Workload.kv_tokens` KV tokens (prompt + new - 1: the last new token
is never fed back). One meaning of KV bytes for a budget: what the cache allocates for it (`kv_store_bytes`: budget
plus room for one prefill chunk, int4's full-precision window, whole batch, all layers), which is also what the fixed
run measures, so every fix's estimate can be checked against its outcome.
"""

from __future__ import annotations

from dataclasses import replace

from kvscope.doctor.execute import Outcome
from kvscope.models.spec import ModelSpec
from kvscope.planner import search
from kvscope.planner.advice import Fix
from kvscope.planner.memory import kv_store_bytes, recall_host_bytes
from kvscope.planner.sizes import format_bytes as fb
from kvscope.planner.workload import Workload
from kvscope.policies import preferred_for
from kvscope.report.model import Diagnosis, Figure

FRAGMENTATION_SHARE = 0.05  # reserved-but-unallocated above this share of capacity is worth a fix of its own


def workload_dict(spec: ModelSpec, w: Workload) -> dict:
    """A workload as the report shows it: its fields, its KV tokens, its policy and (kvscope runtime) the KV storage
    its budget allocates."""
    kvscope = w.runtime == "kvscope"
    return {**w.to_dict(), "kv_tokens": w.kv_tokens, "policy": w.policy if kvscope else None,
            "kv_budget_bytes": kv_store_bytes(spec, w) if kvscope else None}


def figure(label: str, *, bytes_: int | None = None, tokens: int | None = None, detail: str = "") -> Figure:
    """One headline figure of the report: a labelled number of bytes or tokens with a line saying what it is."""
    return Figure(label, bytes_, tokens, detail)


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
             spec: ModelSpec, cuda: bool = True) -> Diagnosis:
    """headline, explanation, labelled figures and the option to change, for what happened to `w`."""
    if o.status == "oom":
        return _oom(o, prediction, parts, capacity)
    if o.status == "kv_budget_exceeded":
        return _over_budget(o, w, spec)
    predicted = prediction["needed_bytes"]
    if o.status == "error":
        return _result("The run failed", o.error or "", [figure("available", bytes_=capacity)])
    if o.peak_allocated_bytes is None:
        figures = [figure("peak process memory (RSS)", bytes_=o.peak_rss_bytes, detail="measured on the CPU"),
                   figure("available", bytes_=capacity, detail="host memory, or --gpu-memory"),
                   figure("KV cache", bytes_=o.kv_bytes, detail="allocated by the cache, whole batch")]
        return _result(f"Completed on the CPU: peak process memory {fb(o.peak_rss_bytes)}, KV cache {fb(o.kv_bytes)}",
                       "No CUDA device: the doctor measured process memory (RSS) and the KV budget instead of GPU "
                       f"memory. The planner's GPU estimate for this workload is {fb(predicted)}.", figures)
    measured = o.peak_allocated_bytes
    err = (prediction["peak_bytes"] - measured) / measured if measured else 0.0
    figures = [figure("needed by the workload", bytes_=predicted, detail="planner: peak allocated + overhead"),
               figure("available", bytes_=capacity),
               figure("measured peak allocated", bytes_=measured, detail=f"planner peak {fb(prediction['peak_bytes'])}"
                      f" ({err:+.1%})")]
    return _result(f"Completed: peak {fb(measured)} allocated of {fb(capacity)} "
                   f"({(capacity - measured) / capacity:.0%} headroom)",
                   f"The planner predicted a peak of {fb(prediction['peak_bytes'])} allocated ({err:+.1%} against the "
                   "measurement).", figures)


def _result(headline: str, explanation: str, figures: list[Figure], *, option: str | None = None,
            expandable: bool = False) -> Diagnosis:
    by_label = {f.label: f.bytes for f in figures}
    return Diagnosis(headline, explanation, figures, by_label.get("needed by the workload"), by_label.get("available"),
                     by_label.get("held at the failure"), option, expandable)


def _oom(o: Outcome, prediction: dict, parts: dict[str, int], capacity: int) -> Diagnosis:
    f = o.at_failure
    needed = prediction["needed_bytes"]
    biggest = max(("weights", "kv_cache", "activations"), key=lambda k: parts[k])
    frag = parts["fragmentation"] > FRAGMENTATION_SHARE * capacity
    where = f" in {o.failed_in}" if o.failed_in else ""
    text = (f"The workload needs about {fb(needed)} (the planner's peak allocated {fb(prediction['peak_bytes'])} plus "
            f"{fb(prediction['overhead_bytes'])} of CUDA context and allocator slack); {fb(capacity)} are available. "
            f"It failed{where}: PyTorch held {fb(f.allocated)} (weights {fb(parts['weights'])}, KV cache "
            f"{fb(parts['kv_cache'])}, activations and temporaries {fb(parts['activations'])}) and asked for "
            f"{fb(f.tried_to_allocate or 0)} more. The largest part was {biggest.replace('_', ' ')}. Reserved but "
            f"unallocated (fragmentation): {fb(parts['fragmentation'])}.")
    if frag:
        text += (" Fragmentation is large: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True so freed blocks "
                 "can be reused for larger requests.")
    figures = [figure("needed by the workload", bytes_=needed, detail="planner: peak allocated + overhead"),
               figure("available", bytes_=capacity),
               figure("held at the failure", bytes_=f.allocated,
                      detail=f"allocated by PyTorch{where}; it asked for {fb(f.tried_to_allocate or 0)} more")]
    if needed > capacity:
        figures.append(figure("short by", bytes_=needed - capacity, detail="needed - available"))
    return _result(f"Out of GPU memory: the workload needs about {fb(needed)}, {fb(capacity)} available "
                   f"({fb(f.allocated)} held at the failure)", text, figures, expandable=frag)


def _over_budget(o: Outcome, w: Workload, spec: ModelSpec) -> Diagnosis:
    policy = w.cache_policy
    need, budget = w.kv_tokens, w.budget_tokens or 0
    needed = kv_store_bytes(spec, w.with_(budget_tokens=need))
    available = kv_store_bytes(spec, w)
    room = min(w.chunk_size, w.context)
    where = o.failed_in or "the run"
    text = (f"Policy '{policy}' never evicts, so every layer must hold the whole sequence: {w.context} prompt + "
            f"{w.new_tokens} new tokens - 1 = {need} KV tokens per sequence (the last new token is never fed back). "
            f"The run stopped in {where}, where layer 0 had to hold {o.held_tokens} tokens per sequence. For the "
            f"batch of {w.batch}, the cache allocates {fb(available)} for the budget ({budget} tokens + room for one "
            f"{room}-token prefill chunk, {spec.num_layers} layers); holding the whole sequence takes {fb(needed)}.")
    figures = [figure("needed by the workload", tokens=need, bytes_=needed,
                      detail=f"KV tokens per sequence; the bytes are the KV storage for the batch at --budget {need}"),
               figure("available", tokens=budget, bytes_=available,
                      detail="the budget, per sequence; the bytes are what the cache allocates for it (with room "
                      "for one prefill chunk)"),
               figure("held at the failure", tokens=o.held_tokens,
                      detail=f"per sequence, in layer 0, in {where}; {fb(o.kv_bytes)} of KV storage allocated by "
                      "then (layers allocate as the first chunk reaches them)")]
    return _result(f"KV budget exceeded: the sequence needs {need} KV tokens per layer, the budget holds {budget}",
                   text, figures, option="--budget or --policy")


def fixes_from_plan(advice: list[Fix], cuda: bool, device: str = "cuda") -> list[Fix]:
    """The planner's ranked fixes, each said applicable when this machine can run it (one GPU of its own size; a
    weight format that runs on this device: the doctor quantizes the loaded model for the re-run)."""
    return [replace(f, applicable=cuda and "gpu" not in f.changes and f.changes.get("tp", 1) == 1
                    and _runs_here(f.changes.get("weights"), device)) for f in advice]


def _runs_here(weights: str | None, device: str) -> bool:
    if weights is None:
        return True
    from kvscope.errors import UsageError
    from kvscope.models.quantize import check_runnable

    try:
        check_runnable(weights, device)
    except UsageError:
        return False
    return True


RECALLS = ("snapkv", "lru", "h2o", "tova")  # the policies that read attention, so can score a recall


def fixes_for_budget(spec: ModelSpec, w: Workload) -> list[Fix]:
    """Fixes for a KV budget that a non-evicting policy outgrew, cheapest in quality first. Every estimate is the KV
    storage the fixed cache allocates (planner.memory.kv_store_bytes), which the fixed run measures."""
    need, budget = w.kv_tokens, w.budget_tokens or 0
    available = kv_store_bytes(spec, w)
    out: list[Fix] = []

    def add(option: str, action: str, new: Workload, message: str, **changes) -> None:
        est = kv_store_bytes(spec, new)
        out.append(Fix(len(out) + 1, action, option, kv_store_bytes(spec, w.with_(budget_tokens=need)), available, est,
                       True, "", w.changes_to(new) | changes, new, "KV storage", message.format(est=fb(est))))

    for kv, cost in (("int8", "perplexity within about 1%"), ("int4", "perplexity within about 5%")):
        if kv == w.kv_dtype or not spec.supports_kv_dtype(kv):
            continue
        held = search.largest(lambda n, kv=kv: kv_store_bytes(spec, w.with_(kv_dtype=kv, budget_tokens=n)) <= available,
                              1, need)
        if held >= need:
            window = " (with its 128-token full-precision window per layer)" if kv == "int4" else ""
            add(f"--kv-dtype {kv} --budget {need}", f"store the KV cache as {kv}", w.with_(kv_dtype=kv,
                budget_tokens=need), f"as {kv} the whole sequence ({need} tokens) takes {{est}} of KV storage{window}, "
                f"within the {fb(available)} the budget allocates now; {cost}, nothing evicted")
    evict = preferred_for(budget)
    evicting = w.with_(policy=evict, knobs=w.knobs if evict == w.policy else {})
    if w.context > w.chunk_size and evict in RECALLS:  # a bounded prefill evicts before it sees the question
        recalled = evicting.with_(recall="cpu")  # ranked first: the same device memory, the question's tokens kept
        add(f"--policy {evict} --budget {budget} --recall cpu", f"evict with {evict} and recall from CPU memory",
            recalled, f"keeps {budget} of {need} KV tokens per sequence in {{est}} on the device; the "
            f"{-(-w.context // w.chunk_size)}-chunk prefill's evictions wait in up to "
            f"{fb(recall_host_bytes(spec, recalled))} of host memory until the prompt's last chunk (the question) "
            "picks which come back (docs/benchmarks.md, section recall)", policy=evict, recall="cpu")
    add(f"--policy {evict} --budget {budget}", f"evict with {evict} at the same budget", evicting,
        f"keeps {budget} of {need} KV tokens per sequence ({budget / need:.0%}) in {{est}}; quality depends on the "
        "policy (see docs/benchmarks.md)", policy=evict)
    add(f"--budget {need}", "raise the budget to the whole sequence", w.with_(budget_tokens=need),
        f"needs {{est}} of KV storage instead of {fb(available)}; nothing evicted")
    return out
