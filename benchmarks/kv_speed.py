"""Decode speed and memory of kvscope's cache on a GPU: KV dtypes, layer offload, session swap, and the kvscope
runtime's peak memory against the planner. Runs plain transformers in the same process as the baseline.

    python -m benchmarks.kv_speed --out out/kv_speed.json      # needs CUDA; writes sections "kv-dtype-speed" and
                                                               # "kv-speed" (--section) of docs/benchmarks.md
    python -m benchmarks.kv_speed --render docs/data/kv-policy-speed.json   # rewrite a section from a run's JSON

The JSON records the run (device, date, commit, command) and the section it writes, so a section is rebuilt from
the repository alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import (
    clean,
    plain_decode_tps,
    render_command,
    run_meta,
    save_json,
    section_head,
    table,
    write_section,
)
from kvscope.cache import BudgetedCache, fused
from kvscope.models import load
from kvscope.planner import Workload, plan
from kvscope.runtime import generate

GIB = 1024**3


def kvscope_run(model, ids, new: int, policy: str = "full", budget: int | None = None, **cache_kwargs) -> dict:
    base = clean()
    cache = BudgetedCache(model, policy, budget_tokens=budget or ids.shape[1] + new + 1, **cache_kwargs)
    g = generate(model, ids, cache, max_new_tokens=new, chunk_size=cache.chunk_size)
    row = {"decode_tps": round(g.decode_tokens_per_second, 2), "prefill_s": round(g.prefill_seconds, 2),
           "kv_allocated": cache.allocated_bytes, "kv_on_gpu": cache.gpu_resident_bytes,
           "peak": torch.cuda.max_memory_allocated(), "peak_over_base": torch.cuda.max_memory_allocated() - base}
    del cache
    clean()
    return row


KV_DTYPES = (None, "fp8", "int8", "int4")


def dtype_speed(model, spec, new: int, rounds: int, path: str, results: dict) -> dict:
    """Decode tok/s at 8k per KV dtype, with and without the fused decode attention, interleaved over `rounds` (the
    median is reported: the shared host's CPU speed drifts between runs); batch 1 and batch 8; GPU time per step."""
    out = {"rounds": rounds, "new": new, "rows": []}  # saved to `path` after every row: a timeout loses nothing
    for batch, reps in ((1, rounds), (8, 1)):
        ids = torch.randint(10, spec.vocab_size, (batch, 8192), device="cuda")
        samples: dict = {}
        hf = []
        for _ in range(reps):
            hf.append(plain_decode_tps(model, ids, new))
            for kv in KV_DTYPES:
                for fuse in (True, False):
                    fused.DECODE_ATTENTION = fuse
                    r = kvscope_run(model, ids, new, kv_dtype=kv)
                    samples.setdefault((kv, fuse), []).append(r)
                    print(batch, kv, fuse, r["decode_tps"], flush=True)
        fused.DECODE_ATTENTION = True
        out["rows"].append({"batch": batch, "config": "plain transformers generate() (DynamicCache)",
                            "decode_tps": round(statistics.median(hf), 2), "samples": [round(x, 2) for x in hf]})
        save_json(results | {"dtypes": out}, path)
        for (kv, fuse), rs in samples.items():
            tps = [r["decode_tps"] for r in rs]
            row = {"batch": batch, "kv": kv or "bf16", "fused": fuse, "decode_tps": statistics.median(tps),
                   "samples": tps, "kv_allocated": rs[0]["kv_allocated"]}
            if batch == 1:
                fused.DECODE_ATTENTION = fuse
                row.update(decode_profile(model, ids, kv))
                fused.DECODE_ATTENTION = True
            out["rows"].append(row)
            save_json(results | {"dtypes": out}, path)
            print(row, flush=True)
        del ids
    return out


def policy_speed(model, spec, new: int, rounds: int, names: str, path: str, results: dict) -> list[dict]:
    """Decode tok/s at 8k with a budget of 2048 per policy and `evict_batch` (1 and 32), with the fused decode
    attention and without it (the unfused path: dense read, mask, sdpa, and for attention-reading policies a second
    matmul for their weights), interleaved over `rounds`; medians and every sample."""
    ids = torch.randint(10, spec.vocab_size, (1, 8192), device="cuda")
    configs = [(p, b) for p in names.split(",") for b in ((1,) if p == "full" else (1, 32))]
    samples: dict = {}
    for _ in range(rounds):
        for policy, batch in configs:
            for fuse in (True, False):
                fused.DECODE_ATTENTION = fuse
                r = kvscope_run(model, ids, new, policy=policy, budget=None if policy == "full" else 2048,
                                evict_batch=batch)
                samples.setdefault((policy, batch, fuse), []).append(r)
                print(policy, batch, fuse, r["decode_tps"], flush=True)
        fused.DECODE_ATTENTION = True
        save_json(results | {"policy_samples": {str(k): [r["decode_tps"] for r in v] for k, v in samples.items()}},
                  path)
    rows = []
    for policy, batch in configs:
        med = {f: statistics.median(r["decode_tps"] for r in samples[(policy, batch, f)]) for f in (True, False)}
        rows.append({"policy": policy, "budget": "-" if policy == "full" else 2048, "evict_batch": batch,
                     "decode_tps": med[True], "unfused_tps": med[False],
                     "fused_vs_unfused": f"{med[True] / med[False]:.2f}x",
                     "samples": [r["decode_tps"] for r in samples[(policy, batch, True)]],
                     "unfused_samples": [r["decode_tps"] for r in samples[(policy, batch, False)]],
                     "prefill_s": statistics.median(r["prefill_s"] for r in samples[(policy, batch, True)])})
    return rows


KERNEL_KINDS = (("attention (fused, kvscope)", ("kvscope_decode",)),
                ("attention (sdpa)", ("flash", "fmha", "attention", "softmax")),
                ("KV write (quantize)", ("_pertoken_write", "_int4_ring_write")),
                ("KV read (dequantize)", ("_pertoken_read", "_int4_read")),
                ("matmul", ("gemm", "nvjet", "cutlass", "sm90", "matmul")))


def decode_profile(model, ids, kv_dtype, steps: int = 8) -> dict:
    """GPU time and kernel launches per decode step, by kind of kernel, from torch.profiler over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    clean()
    cache = BudgetedCache(model, "full", budget_tokens=ids.shape[1] + steps + 2, kv_dtype=kv_dtype)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True)

    def on_phase(phase, done, total):
        if phase == "prefill" and done == total:
            torch.cuda.synchronize()
            prof.start()
        elif phase == "decode" and done == steps:
            torch.cuda.synchronize()
            prof.stop()
    generate(model, ids, cache, max_new_tokens=steps + 1, chunk_size=cache.chunk_size, on_phase=on_phase)
    kinds: dict = {}
    launches = 0
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or not e.self_device_time_total:
            continue
        name = e.key.lower()
        kind = next((k for k, marks in KERNEL_KINDS if any(m in name for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1000 / steps
        launches += e.count
    del cache
    clean()
    return {"gpu_ms_per_step": round(sum(kinds.values()), 2), "kernels_per_step": round(launches / steps, 1),
            "gpu_ms_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}


def swap_rate(model, ids) -> dict:
    clean()
    cache = BudgetedCache(model, "full", budget_tokens=ids.shape[1] + 2)
    generate(model, ids, cache, max_new_tokens=1)
    out = cache.swap_out()
    back = cache.swap_in()
    row = {"bytes": out.bytes, "out_s": round(out.seconds, 4), "in_s": round(back.seconds, 4),
           "out_gbps": round(out.gb_per_second, 2), "in_gbps": round(back.gb_per_second, 2)}
    del cache
    clean()
    return row


def runtime_peaks(model, spec) -> list[dict]:
    """kvscope runtime: measured max_memory_allocated vs `plan --runtime kvscope`."""
    rows = []
    for batch, context, new, budget, kv in ((1, 8000, 16, None, None), (8, 4096, 16, 1024, None),
                                            (16, 8000, 8, 2048, "int8"), (32, 8000, 8, None, "fp8")):
        clean()
        ids = torch.randint(10, spec.vocab_size, (batch, context), device="cuda")
        w = Workload(batch=batch, context=context, new_tokens=new, runtime="kvscope", budget_tokens=budget,
                     kv_dtype=kv)
        p = plan(spec, w, gpu_memory=torch.cuda.get_device_properties(0).total_memory, advice=False)
        row = {"batch": batch, "context": context, "new": new, "budget": budget or "-", "kv": kv or "bf16",
               "predicted": p.peak_bytes}
        try:
            cache = BudgetedCache(model, "snapkv" if budget else "full", budget_tokens=budget or context + new,
                                  kv_dtype=kv)
            generate(model, ids, cache, max_new_tokens=new)
            row["measured"] = torch.cuda.max_memory_allocated()
            row["error_pct"] = round(100 * (p.peak_bytes - row["measured"]) / row["measured"], 2)
            del cache
        except torch.OutOfMemoryError:
            row["measured"] = "OOM"
        rows.append(row)
        print(row, flush=True)
        del ids
    clean()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/kv_speed.json")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype-new", type=int, default=65,
                    help="decode steps timed per KV dtype: 64 covers one int4 ring flush, as in a long decode")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the KV dtype runs (median)")
    ap.add_argument("--policies", default="full,sliding_window,streaming_llm,knorm,tova,snapkv,h2o,lru",
                    help="eviction policies of the policy-speed table")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: dtypes,policies,offload,swap,peaks")
    ap.add_argument("--offload-contexts", default="8192,32768", help="prompt lengths of the offload runs")
    ap.add_argument("--offload-kv", default="bf16", help="KV dtypes of the offload runs (comma list)")
    ap.add_argument("--section", default="kv-speed", help="docs section for everything but the KV dtype table")
    ap.add_argument("--render", metavar="JSON", help="only write docs/benchmarks.md from a saved result")
    args = ap.parse_args(argv)
    if args.render:
        write_sections(json.loads(Path(args.render).read_text()))
        return
    results: dict = {"meta": {**run_meta(), "section": args.section}}
    measure(args, results)
    save_json(results, args.out)
    write_sections(results)


def measure(args, results: dict) -> None:
    """Every part not in --skip, saved to --out as it ends (a timeout loses only the part running)."""
    skip = set(filter(None, args.skip.split(",")))
    model, _, spec = load("llama-3.1-8b", random_weights=True, device="cuda", dtype="bf16")
    model.generation_config.max_length = None
    # warm-up: the first run of each kernel (and the CUDA context's lazy modules) must not count
    for kv in (None, "fp8", "int8", "int4"):
        kvscope_run(model, torch.randint(10, spec.vocab_size, (1, 1024), device="cuda"), 8, kv_dtype=kv)
    if "dtypes" not in skip:
        results["dtypes"] = dtype_speed(model, spec, args.dtype_new, args.rounds, args.out, results)
    if "policies" not in skip:
        results["policies"] = policy_speed(model, spec, args.new, args.rounds, args.policies, args.out, results)
    if "offload" not in skip:
        results["offload"] = offload_speed(model, spec, args, results)
    if "swap" not in skip:
        results["swap"] = swap_rate(model, torch.randint(10, spec.vocab_size, (4, 8192), device="cuda"))
        print(results["swap"], flush=True)
    if "peaks" not in skip:
        results["peaks"] = runtime_peaks(model, spec)


def offload_speed(model, spec, args, results: dict) -> list[dict]:
    rows = []
    for ctx in map(int, args.offload_contexts.split(",")):
        ids = torch.randint(10, spec.vocab_size, (1, ctx), device="cuda")
        for kv in args.offload_kv.split(","):
            for off in (False, True):
                r = kvscope_run(model, ids, args.new, offload=off, kv_dtype=None if kv == "bf16" else kv)
                r.update(context=ctx, offload=off, kv=kv)
                rows.append(r)
                save_json(results | {"offload": rows}, args.out)
                print(r, flush=True)
    return rows


DTYPE_SECTION = "kv-dtype-speed"
TITLES = {DTYPE_SECTION: "Decode speed per KV dtype: `llama-3.1-8b` shape, random bf16 weights",
          "kv-speed": "Eviction-policy speed, offload, swap and runtime peaks: `llama-3.1-8b` shape, random bf16 "
                      "weights"}


def split_sections(results: dict) -> dict[str, dict]:
    """A run's JSON as the inputs of its sections: the KV dtype table's (kv-dtype-speed) and the other parts' (the
    run's `--section`), each with the run's meta."""
    meta = results["meta"]
    out = {}
    if "dtypes" in results:
        out[DTYPE_SECTION] = {"meta": {**meta, "section": DTYPE_SECTION}, "dtypes": results["dtypes"]}
    rest = {k: v for k, v in results.items() if k not in ("meta", "dtypes")}
    if rest:
        out[meta.get("section", "kv-speed")] = {"meta": meta, **rest}
    return out


def write_sections(results: dict) -> None:
    for section, data in split_sections(results).items():
        body = render_dtypes(data["dtypes"]) if section == DTYPE_SECTION else render(data)
        write_section(section, _head(section, data["meta"]) + body)


def _head(section: str, meta: dict) -> str:
    data, rebuild = render_command("kv_speed", section)
    title = meta.get("title") or TITLES.get(section, TITLES["kv-speed"])
    return section_head(title, meta, data, rebuild, section)


def render_dtypes(d: dict) -> str:
    md = (f"### Decode tokens/s per KV dtype, 8192-token prompt, {d['new'] - 1} decode steps timed\n\n"
          f"Median of {d['rounds']} interleaved runs at batch 1 (every sample listed), one run at batch 8. "
          "`fused`: the one-token attention runs as kvscope's fused Triton kernel straight from the stored "
          "(quantized) slots (kvscope.cache.attention_triton); `unfused`: the store is read into a dense bf16 "
          "copy, a mask is built and sdpa runs (the path before that kernel; the stores' own write/read kernels "
          "are on in both). GPU ms / step and kernels / step come from torch.profiler over 8 decode steps of a "
          "separate run.\n\n")
    for batch in sorted({row["batch"] for row in d["rows"]}):
        rows = [row for row in d["rows"] if row["batch"] == batch]
        base = {row["fused"]: row["decode_tps"] for row in rows if row.get("kv") == "bf16"}
        for row in rows:
            if "kv" in row:
                row["vs"] = f"{row['decode_tps'] / base[row['fused']]:.2f}x"
                row["mode"] = "fused" if row["fused"] else "unfused"
                row["kv_gib"] = f"{row['kv_allocated'] / GIB:.2f}"
                by_kind = row.get("gpu_ms_by_kind", {})
                row["where"] = ", ".join(f"{k} {v}" for k, v in by_kind.items())
            else:
                row["kv"], row["mode"] = row["config"], ""
        md += f"Batch {batch}:\n\n" + table(rows, [
            ("kv", "KV dtype"), ("mode", "attention"), ("decode_tps", "decode tok/s"), ("vs", "vs bf16, same mode"),
            ("samples", "samples"), ("kv_gib", "KV GiB"), ("gpu_ms_per_step", "GPU ms / step"),
            ("kernels_per_step", "kernels / step"), ("where", "GPU ms / step by kernel kind")]) + "\n"
    return md


def render(r: dict) -> str:
    md = ""
    g = lambda n: f"{n / GIB:.2f}" if isinstance(n, (int, float)) else str(n)  # noqa: E731
    if "policies" in r:
        md += ("\n### Cost of eviction policies: 8192-token prompt, budget 2048, decode tok/s\n\n"
               "Policies that need attention scores (tova, snapkv, h2o, lru) compute only the rows they need from "
               "the query states the attention already has.\n\n")
        if "unfused_tps" in r["policies"][0]:
            md += ("Median of interleaved runs (samples listed). `fused`: decode steps run kvscope's fused decode "
                   "attention, which also returns the weights an attention-reading policy observes; `unfused`: "
                   "dense read, mask, sdpa, and for those policies a second matmul for the weights.\n\n")
            md += table(r["policies"], [("policy", "policy"), ("budget", "budget"), ("evict_batch", "evict_batch"),
                                        ("decode_tps", "fused tok/s"), ("unfused_tps", "unfused tok/s"),
                                        ("fused_vs_unfused", "fused / unfused"), ("samples", "fused samples"),
                                        ("unfused_samples", "unfused samples"), ("prefill_s", "prefill s")])
        else:  # runs before `evict_batch` was a column have none
            batch = [("evict_batch", "evict_batch")] if any("evict_batch" in p for p in r["policies"]) else []
            md += table(r["policies"], [("policy", "policy"), ("budget", "budget"), *batch,
                                        ("decode_tps", "decode tok/s"), ("prefill_s", "prefill s")])
    if "offload" in r:
        for row in r["offload"]:
            row["kv_gpu"], row["kv_all"] = g(row["kv_on_gpu"]), g(row["kv_allocated"])
        kv = [("kv", "KV dtype")] if any("kv" in row for row in r["offload"]) else []  # older runs: bf16 only
        md += "\n### Layer offload\n\n" + table(r["offload"], [
            ("context", "prompt"), *kv, ("offload", "offload"), ("decode_tps", "decode tok/s"),
            ("kv_gpu", "KV GiB on GPU"), ("kv_all", "KV GiB in all"), ("prefill_s", "prefill s")])
    if "swap" in r:
        s = r["swap"]
        md += (f"\n### Session swap\n\n{s['bytes']:,} bytes (4 x 8192 tokens): out {s['out_s']} s "
               f"({s['out_gbps']} GB/s), in {s['in_s']} s ({s['in_gbps']} GB/s), "
               "bit-exact (tests/cache/test_offload.py).\n")
    if "peaks" in r:
        for row in r["peaks"]:
            row["m"], row["p"] = g(row["measured"]), g(row["predicted"])
        md += "\n### kvscope runtime peak vs `kvscope plan --runtime kvscope`\n\n" + table(r["peaks"], [
            ("batch", "batch"), ("context", "prompt"), ("new", "new"), ("budget", "budget"), ("kv", "KV"),
            ("m", "measured GiB"), ("p", "predicted GiB"), ("error_pct", "error %")])
    return md


if __name__ == "__main__":
    main()
