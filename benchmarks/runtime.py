"""kvscope's runtime on a GPU against plain transformers in the same process: decode speed against the memory-bandwidth
limit, eviction policies against a full cache of the same size, capacity (tokens in flight before OOM), the planner
against measured peaks, and the cost of monitoring.

    python -m benchmarks.runtime --out out/runtime                     # every part; needs CUDA
    python -m benchmarks.runtime --parts decode,policies --out out/runtime
    python -m benchmarks.runtime --render out/runtime                  # rewrite the docs sections from saved JSON

Each part saves `<out>/runtime-<part>.json` as soon as it ends (a timeout loses only the part running) and the
render step writes the sections `runtime-<part>` of docs/benchmarks.md from those files. Ratios are measured side by
side in one process; memory is measured from a clean allocator (gc.collect, empty_cache) whose baseline is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import clean, command_line, commit, device_line, median_us, plain_decode_tps, sync
from kvscope.cache import BudgetedCache
from kvscope.models import load
from kvscope.monitor import Monitor
from kvscope.planner import Workload, plan, search
from kvscope.runtime import generate

PARTS = ("decode", "policies", "capacity", "monitor", "profile", "recall", "cpu")
CPU_PARTS = {"cpu"}  # parts that run on a machine without CUDA
GIB = 1024**3


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (bytes read + bytes written), median of 10 copies of 4 GiB."""
    a = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = median_us(functools.partial(b.copy_, a), iters=10, warmup=1) / 1e6
    del a, b
    clean()
    return 2 * 2 * GIB / seconds


WARM_STEPS = 160  # decode steps before timing: every graph (step, refill every 64, eviction every 32) is captured


def kvscope_decode(model, ids, new: int, policy: str = "full", budget: int | None = None, decode: str = "auto",
                   monitor: Monitor | None = None, **knobs) -> dict:
    """Prefill `ids` and decode WARM_STEPS tokens (each decode graph runs once eagerly, is captured the second time:
    those one-time costs stay out of the timing), then time a continuation of `new` steps (replays only). Returns
    tok/s, prefill seconds and the peak over the allocator's baseline."""
    base = clean()
    n = ids.shape[1]
    cache = BudgetedCache(model, policy, budget_tokens=budget or n + WARM_STEPS + new + 8, **knobs)
    first = generate(model, ids, cache, max_new_tokens=WARM_STEPS, decode=decode)
    nxt = first.sequences[:, -1:]
    on_phase = _doctor_marks(monitor, cache) if monitor is not None else None
    gen = generate(model, nxt, cache, max_new_tokens=new, decode=decode, on_phase=on_phase)
    sync()
    peak = torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else None
    row = {"decode_tps": gen.decode_tokens_per_second, "prefill_s": first.prefill_seconds,
           "peak_over_base": peak, "base": base, "cache_bytes": cache.settings.arena.nbytes,
           "evicted": cache.stats().evicted_tokens}
    del cache, first, gen
    clean()
    return row


def _doctor_marks(monitor: Monitor, cache):
    """What the doctor does while decoding: phase marks, and a KV snapshot on the timeline every 8 steps."""
    def on_phase(phase, done, total):
        if done in (1, total):
            monitor.mark(phase, f"{done}/{total}")
        if done % 8 == 0:
            monitor.record_kv(cache.stats())
    return on_phase


def part_decode(model, spec, args) -> dict:
    bw = copy_bandwidth()
    weights = spec.weights_bytes("bf16")
    limit = bw / weights
    rows = []
    for batch, context in ((1, 1024), (1, 8192), (1, 32768), (8, 1024), (32, 1024)):
        ids = torch.randint(10, spec.vocab_size, (batch, context), device="cuda")
        ours = kvscope_decode(model, ids, args.new)
        eager = kvscope_decode(model, ids, args.new // 4, decode="forward") if context == 1024 else None
        plain = plain_decode_tps(model, ids, args.plain_new)
        kv_read = batch * (context + args.new) * spec.kv_bytes_per_token("bf16")
        steps = ours["decode_tps"]  # decode steps per second: tokens per second per sequence
        rows.append({"batch": batch, "context": context, "plain_tps": round(plain, 1), "kvscope_tps": round(steps, 1),
                     "total_tps": round(steps * batch, 0),
                     "eager_tps": round(eager["decode_tps"], 1) if eager else None,
                     "gbps": round((weights + kv_read) * steps / 1e9, 0),
                     "limit_pct": round(100 * steps / limit, 1) if batch == 1 else None,
                     "speedup": round(steps / plain, 1), "prefill_s": round(ours["prefill_s"], 2)})
        print("decode", rows[-1], flush=True)
    return {"copy_bandwidth_tbps": round(bw / 1e12, 3), "weights_bytes": weights, "limit_tps": round(limit, 1),
            "new": args.new, "rows": rows}


def part_policies(model, spec, args) -> dict:
    """Decode at budget 2048 after a 32k prompt (evict_batch 32) against a full cache holding 2048 tokens:
    `--rounds` interleaved rounds (the full cache, then each policy), medians; each ratio is of the medians."""
    full_ids = torch.randint(10, spec.vocab_size, (1, 2048 - WARM_STEPS - args.new - 16), device="cuda")
    ids = torch.randint(10, spec.vocab_size, (1, 32768), device="cuda")
    names = args.policies.split(",")
    samples: dict[str, list[dict]] = {name: [] for name in ["full", *names]}
    for _ in range(args.rounds):
        samples["full"].append(kvscope_decode(model, full_ids, args.new))
        for policy in names:
            samples[policy].append(kvscope_decode(model, ids, args.new, policy=policy, budget=2048, evict_batch=32))
            print("policies", policy, round(samples[policy][-1]["decode_tps"], 1), flush=True)
    ref = statistics.median(r["decode_tps"] for r in samples["full"])
    rows = []
    for name, runs in samples.items():
        tps = statistics.median(r["decode_tps"] for r in runs)
        rows.append({"policy": "full (2048-token cache)" if name == "full" else name, "decode_tps": round(tps, 1),
                     "vs_full": round(tps / ref, 3),
                     "prefill_s": round(statistics.median(r["prefill_s"] for r in runs), 2),
                     "rounds": [round(r["decode_tps"], 1) for r in runs]}
                    | ({} if name == "full" else {"evicted": runs[-1]["evicted"]}))
    return {"new": args.new, "rounds": args.rounds, "rows": rows}


def _oom_probe(run) -> tuple[bool, int | None, str, int]:
    """(ran, peak over the baseline, the OOM's first line, the baseline: weights, buffers, the prompt ids)."""
    base = clean()
    try:
        run()
        torch.cuda.synchronize()
        return True, torch.cuda.max_memory_allocated() - base, "", base
    except torch.OutOfMemoryError as exc:
        return False, None, str(exc).split("\n")[0][:160], base
    finally:
        clean()


class _OutOfProbes(Exception):
    pass


def part_capacity(model, spec, args) -> dict:
    total = torch.cuda.get_device_properties(0).total_memory
    free, _ = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()  # CUDA context and libraries, outside PyTorch's counters
    weights = spec.weights_bytes("bf16")
    out = {"total_bytes": total, "outside_bytes": outside, "weights_bytes": weights, "context": 4096, "new": 16,
           "runs": []}
    kvs = args.kv_dtypes.split(",")
    # plain generate() keeps bf16 KV only: it is measured beside kvscope's bf16 run
    for runtime, kv in [("kvscope", k) for k in kvs] + ([("hf", "bf16")] if "bf16" in kvs else []):
        def keep(run: dict, i: int = len(out["runs"])) -> None:
            out["runs"][i:] = [run]
            _save(args, "capacity", out)

        keep(_largest_batch(model, spec, runtime, kv, total, weights, outside, args, on_probe=keep))
    return out


def _largest_batch(model, spec, runtime: str, kv: str, total: int, weights: int, outside: int, args,
                   on_probe=lambda run: None) -> dict:
    """The largest batch that runs, searched from the planner's; `on_probe` gets the run's record after every probe
    (saved as it goes: a timeout keeps the probes done)."""
    context, new = 4096, 16
    w = Workload(batch=1, context=context, new_tokens=new, runtime=runtime, kv_dtype=kv,
                 policy="full" if runtime == "kvscope" else None)
    predicted = search.max_batch(spec, w, total)
    start = args.start if args.start and runtime == "kvscope" else predicted
    probes: list[dict] = []

    def ok(b: int) -> bool:
        if len(probes) >= args.max_probes:  # bounded device time: report the bracket found so far
            raise _OutOfProbes
        ids = torch.randint(10, spec.vocab_size, (b, context), device="cuda")
        t = time.perf_counter()
        good, peak, error, base = _oom_probe(lambda: _one_run(model, ids, runtime, kv, context, new))
        planned = plan(spec, w.with_(batch=b), gpu_memory=total, advice=False)
        probes.append({"batch": b, "ok": good, "peak": peak, "baseline": base, "planned_peak": planned.peak_bytes,
                       "planned_fits": planned.fits, "seconds": round(time.perf_counter() - t, 1), "error": error})
        print("capacity", runtime, kv, probes[-1], flush=True)
        on_probe(record(best_so_far(), False))
        return good

    def best_so_far() -> int:
        return max((p["batch"] for p in probes if p["ok"]), default=0)

    def record(best: int, exact: bool) -> dict:
        ideal = (total - weights - outside) / spec.kv_bytes_per_token(kv)
        return {"runtime": runtime, "kv_dtype": kv, "predicted": predicted, "measured": best,
                "tokens_in_flight": best * (context + new),
                "share_of_ideal": round(best * (context + new) / ideal, 4), "ideal_tokens": int(ideal),
                "exact": exact, "probes": probes}

    try:
        best, exact = search.largest_from(ok, start, 1, 4 * predicted), True
    except _OutOfProbes:
        best, exact = best_so_far(), False
    return record(best, exact)


def _one_run(model, ids, runtime: str, kv: str, context: int, new: int) -> None:
    if runtime == "hf":
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        return
    cache = BudgetedCache(model, "full", budget_tokens=context + new, kv_dtype=kv)
    generate(model, ids, cache, max_new_tokens=new)


def part_monitor(model, spec, args) -> dict:
    ids = torch.randint(10, spec.vocab_size, (1, 8192), device="cuda")
    samples = {"off": [], "on": []}
    for _ in range(args.rounds):
        samples["off"].append(kvscope_decode(model, ids, args.new)["decode_tps"])
        with Monitor(device=0) as monitor:
            samples["on"].append(kvscope_decode(model, ids, args.new, monitor=monitor)["decode_tps"])
        print("monitor", samples, flush=True)
    off, on = statistics.median(samples["off"]), statistics.median(samples["on"])
    return {"samples": samples, "median_off": off, "median_on": on, "slowdown": round(1 - on / off, 4)}


def part_profile(model, spec, args) -> dict:
    """Where a batch-1 decode step's GPU time goes: torch.profiler over graph replays. `full` (the default): 1k
    context, 32 replays. An evicting `--profile-policy`: budget 2048 on a 4,096-token prompt (the policies part uses
    32k: the decode after it is the same, the prefill shorter), `evict_batch=32`, 64 replays (two evictions)."""
    policy = args.profile_policy
    if policy == "full":
        ids, steps = torch.randint(10, spec.vocab_size, (1, 1024), device="cuda"), 32
        cache = BudgetedCache(model, "full", budget_tokens=1024 + WARM_STEPS + 40)
    else:
        ids, steps = torch.randint(10, spec.vocab_size, (1, 4096), device="cuda"), 64
        cache = BudgetedCache(model, policy, budget_tokens=2048, evict_batch=32)
    first = generate(model, ids, cache, max_new_tokens=WARM_STEPS)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gen = generate(model, first.sequences[:, -1:], cache, max_new_tokens=steps + 1)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_time_total > 0:
            rows.append({"kernel": e.key[:90], "calls": e.count, "total_us": round(e.device_time_total, 1),
                         "per_call_us": round(e.device_time_total / max(1, e.count), 2)})
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows)
    del cache
    clean()
    return {"policy": policy, "steps": steps, "gpu_us_per_step": round(total / steps, 1),
            "decode_tps": gen.decode_tokens_per_second, "kernels": rows[:40]}


def part_recall(model, spec, args) -> dict:
    """A 32k prompt prefilled in 512-token chunks under snapkv at budget 2048, with and without the recall tier
    (interleaved rounds): prefill seconds, the allocator's peak over its baseline (weights included in the baseline),
    the cache's one allocation against budget + one chunk. The KV dtype is --kv-dtypes' one (bf16 by default)."""
    context, budget, chunk = 32768, 2048, 512
    ids = torch.randint(10, spec.vocab_size, (1, context), device="cuda")
    kv = args.kv_dtypes
    if "," in kv:
        raise SystemExit(f"--kv-dtypes: the recall part takes one KV dtype, got {kv!r} (run it once a dtype, "
                         "with --tag)")
    per_token = spec.kv_bytes_per_token(kv)
    head = {"context": context, "budget": budget, "chunk": chunk, "policy": "snapkv"}
    if kv != "bf16":
        head["kv_dtype"] = kv
    rows = []
    for round_ in range(args.rounds):
        for recall in (None, "cpu"):
            base = clean()
            torch.cuda.reset_peak_memory_stats()
            cache = BudgetedCache(model, "snapkv", budget_tokens=budget, chunk_size=chunk, recall=recall,
                                  kv_dtype=None if kv == "bf16" else kv)
            gen = generate(model, ids, cache, max_new_tokens=1, chunk_size=chunk)
            sync()
            rows.append({"round": round_, "recall": recall, "prefill_s": round(gen.prefill_seconds, 3),
                         "peak_over_base": torch.cuda.max_memory_allocated() - base,
                         "arena_bytes": cache.settings.arena.nbytes,
                         "kv_store_bytes": (budget + chunk) * per_token,
                         "recalled": max(cache.recalled_tokens)})
            print("recall", rows[-1], flush=True)
            _save(args, "recall", {**head, "rows": rows})  # a run cut short keeps the rows it measured
            del cache, gen
            clean()
    return {**head, "rows": rows}


def part_cpu(model, spec, args) -> dict:
    """The embedded SmolLM2-135M on the CPU (fp32): plain generate() against kvscope's runtime with the model's
    forward (the CPU default) and with kvscope's own step, interleaved rounds, medians."""
    model, tok, spec = load("smollm2-135m", dtype="fp32", device="cpu")
    ids = torch.randint(10, spec.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    samples = {"plain": [], "forward": [], "static": []}
    new = args.cpu_new
    with torch.inference_mode():
        kvscope_decode(model, ids, 4), plain_decode_tps(model, ids, 2)  # warm-up
        for _ in range(args.rounds):
            samples["plain"].append(plain_decode_tps(model, ids, new))
            for mode in ("forward", "static"):
                samples[mode].append(kvscope_decode(model, ids, new, decode=mode)["decode_tps"])
            print("cpu", {k: [round(x, 1) for x in v] for k, v in samples.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"prompt": 512, "new": new, "threads": torch.get_num_threads(), "samples": samples, "median": med,
            "forward_vs_plain": round(med["forward"] / med["plain"], 3),
            "static_vs_plain": round(med["static"] / med["plain"], 3)}


def _save(args, part: str, data: dict) -> None:
    path = Path(args.out) / (f"runtime-{part}.{args.tag}.json" if args.tag else f"runtime-{part}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_line(), "date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": args.command}
    path.write_text(json.dumps({"meta": meta, **data}, indent=1, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--out", default="out/runtime", help="directory for the JSON of each part")
    p.add_argument("--render", metavar="DIR", help="only write the docs sections from the JSON in DIR")
    p.add_argument("--model", default="llama-3.1-8b", help="catalogue shape (random bf16 weights)")
    p.add_argument("--new", type=int, default=128, help="decode steps timed per kvscope run")
    p.add_argument("--plain-new", type=int, default=32, help="decode steps timed per plain generate() run")
    p.add_argument("--policies", default="lru,snapkv,streaming_llm,h2o,tova,sliding_window")
    p.add_argument("--kv-dtypes", default="bf16", help="KV dtypes for the capacity part (bf16,int8,int4); plain "
                   "generate() is measured beside bf16. The recall part takes one")
    p.add_argument("--tag", help="a further run of a part: saved as runtime-<part>.<tag>.json, rendered below the "
                   "section's main run (capacity, recall)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-policy", default="full", help="the profile part's policy (evicting: budget 2048, 4k)")
    p.add_argument("--start", type=int, help="the capacity part's first kvscope batch (default: the planner's largest)")
    p.add_argument("--max-probes", type=int, default=5, help="capacity runs per runtime and KV dtype at most")
    p.add_argument("--cpu-new", type=int, default=48, help="decode steps timed per run of the cpu part")
    args = p.parse_args(argv)
    args.command = command_line()
    if args.render:
        from benchmarks.runtime_render import render

        render(Path(args.render))
        return 0
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; expected some of {', '.join(PARTS)}")
    if not torch.cuda.is_available() and set(parts) - CPU_PARTS:
        p.error(f"the parts {', '.join(sorted(set(parts) - CPU_PARTS))} need a CUDA GPU")
    model = spec = None
    if set(parts) - CPU_PARTS:
        model, _, spec = load(args.model, random_weights=True, device="cuda", dtype="bf16")
    for part in parts:
        data = globals()[f"part_{part}"](model, spec, args)
        # a policy's profile is kept beside the full cache's (the docs section renders the latter)
        _save(args, part if part != "profile" or args.profile_policy == "full" else f"profile-{args.profile_policy}",
              data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
