"""Decode speed and memory of kvscope's cache on a GPU: KV dtypes, layer offload, session swap, and the kvscope
runtime's peak memory against the planner. Runs plain transformers in the same process as the baseline.

    python benchmarks/kv_speed.py --out out/kv_speed.json      # needs CUDA; writes section "kv-speed"
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import header, save_json, table, write_section
from kvscope import _compat
from kvscope.cache import BudgetedCache
from kvscope.models import load
from kvscope.planner import Workload, plan
from kvscope.runtime import generate

GIB = 1024**3


def clean():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def hf_decode_tps(model, ids, new: int) -> float:
    """Decode tokens/s of plain generate(): (time for 1+new tokens - time for 1 token) / new."""
    def timed(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    timed(2)
    one = timed(1)
    full = timed(1 + new)
    return new / (full - one)


def kvscope_run(model, ids, new: int, policy: str = "full", budget: int | None = None, **cache_kwargs) -> dict:
    clean()
    base = torch.cuda.memory_allocated()
    cache = BudgetedCache(model, policy, budget_tokens=budget or ids.shape[1] + new + 1, **cache_kwargs)
    g = generate(model, ids, cache, max_new_tokens=new, chunk_size=cache.chunk_size)
    row = {"decode_tps": round(g.decode_tokens_per_second, 2), "prefill_s": round(g.prefill_seconds, 2),
           "kv_allocated": cache.allocated_bytes, "kv_on_gpu": cache.gpu_resident_bytes,
           "peak": torch.cuda.max_memory_allocated(), "peak_over_base": torch.cuda.max_memory_allocated() - base}
    del cache
    clean()
    return row


def read_cost(model, context: int, kv_dtype: str | None) -> float:
    """Milliseconds to read (dequantize) one layer's store at `context` tokens, x layers = per decode step."""
    from kvscope.cache.store import make_store

    _, _, kv_heads, head_dim = _compat.attention_heads(model)
    store = make_store(kv_dtype, 1, kv_heads, context, head_dim, torch.bfloat16, "cuda")
    k = torch.randn(1, kv_heads, context, head_dim, device="cuda", dtype=torch.bfloat16)
    store.write_range(0, k, k)
    for _ in range(3):
        store.read(context, torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        store.read(context, torch.bfloat16)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 20 * 1000


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/kv_speed.json")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: dtypes,offload,swap,peaks")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {}
    model, _, spec = load("llama-3.1-8b", random_weights=True, device="cuda", dtype="bf16")
    model.generation_config.max_length = None
    # warm-up: the first run of each kernel (and the CUDA context's lazy modules) must not count
    kvscope_run(model, torch.randint(10, spec.vocab_size, (1, 1024), device="cuda"), 8)
    for kv in ("fp8", "int8", "int4"):
        kvscope_run(model, torch.randint(10, spec.vocab_size, (1, 1024), device="cuda"), 8, kv_dtype=kv)
    if "dtypes" not in skip:
        ids = torch.randint(10, spec.vocab_size, (1, 8192), device="cuda")
        base = hf_decode_tps(model, ids, args.new)
        rows = [{"config": "plain transformers generate() (DynamicCache)", "decode_tps": round(base, 2)}]
        for kv in (None, "fp8", "int8", "int4"):
            r = kvscope_run(model, ids, args.new, kv_dtype=kv)
            r["read_ms_per_layer"] = round(read_cost(model, 8192 + args.new, kv), 3)
            r["config"] = f"kvscope {kv or 'bf16'}"
            rows.append(r)
            print(r, flush=True)
        results["dtypes"] = rows
    if "policies" not in skip:
        ids = torch.randint(10, spec.vocab_size, (1, 8192), device="cuda")
        rows = []
        for policy in ("full", "sliding_window", "streaming_llm", "knorm", "tova", "snapkv", "h2o", "lru"):
            for batch in ((1,) if policy == "full" else (1, 32)):
                r = kvscope_run(model, ids, args.new, policy=policy, budget=None if policy == "full" else 2048,
                                evict_batch=batch)
                r.update(policy=policy, budget="-" if policy == "full" else 2048, evict_batch=batch)
                rows.append(r)
                print(r, flush=True)
        results["policies"] = rows
    if "offload" not in skip:
        rows = []
        for ctx in (8192, 32768):
            ids = torch.randint(10, spec.vocab_size, (1, ctx), device="cuda")
            for off in (False, True):
                r = kvscope_run(model, ids, args.new, offload=off)
                r.update(context=ctx, offload=off)
                rows.append(r)
                print(r, flush=True)
        results["offload"] = rows
    if "swap" not in skip:
        ids = torch.randint(10, spec.vocab_size, (4, 8192), device="cuda")
        results["swap"] = swap_rate(model, ids)
        print(results["swap"], flush=True)
    if "peaks" not in skip:
        results["peaks"] = runtime_peaks(model, spec)
    save_json(results, args.out)
    write_section("kv-speed", render(results))


def render(r: dict) -> str:
    md = header("KV storage speed, offload and swap: `llama-3.1-8b` shape, random bf16 weights, batch 1")
    g = lambda n: f"{n / GIB:.2f}" if isinstance(n, (int, float)) else str(n)  # noqa: E731
    if "dtypes" in r:
        base = r["dtypes"][1]["decode_tps"]
        for row in r["dtypes"]:
            row["vs_bf16"] = f"{row['decode_tps'] / base:.2f}x" if row.get("kv_allocated") else ""
            row["kv_gib"] = g(row["kv_allocated"]) if row.get("kv_allocated") else ""
        md += "### Decode tokens/s per KV dtype, 8192-token prompt\n\n" + table(r["dtypes"], [
            ("config", "cache"), ("decode_tps", "decode tok/s"), ("vs_bf16", "vs kvscope bf16"),
            ("kv_gib", "KV GiB"), ("read_ms_per_layer", "read+dequant ms / layer")])
    if "policies" in r:
        md += ("\n### Cost of eviction policies: 8192-token prompt, budget 2048, decode tok/s\n\n"
               "Policies that need attention scores (tova, snapkv, h2o, lru) compute only the rows they need from "
               "the query states the attention already has.\n\n")
        md += table(r["policies"], [("policy", "policy"), ("budget", "budget"), ("evict_batch", "evict_batch"),
                                    ("decode_tps", "decode tok/s"), ("prefill_s", "prefill s")])
    if "offload" in r:
        for row in r["offload"]:
            row["kv_gpu"], row["kv_all"] = g(row["kv_on_gpu"]), g(row["kv_allocated"])
        md += "\n### Layer offload\n\n" + table(r["offload"], [
            ("context", "prompt"), ("offload", "offload"), ("decode_tps", "decode tok/s"),
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
