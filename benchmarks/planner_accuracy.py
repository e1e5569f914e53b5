"""Planner accuracy on a real GPU: plain `transformers` generate() vs `kvscope plan --runtime hf`.

Builds the `llama-3-8b` shape with random bf16 weights on the GPU, runs `model.generate()` (default cache, sdpa) over a
grid of batch x prompt length x new tokens chosen around the planner's predicted OOM boundary, records
`torch.cuda.max_memory_allocated()` / `max_memory_reserved()` and which points ran out of memory, and compares with the
plan. Needs CUDA.

    python -m benchmarks.planner_accuracy --out out/planner.json      # needs CUDA; writes section "planner-accuracy"
    python -m benchmarks.planner_accuracy --render docs/data/planner-accuracy.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from benchmarks.common import render_command, run_meta, save_json, section_head, table, write_section
from kvscope.models import load
from kvscope.planner import Workload, plan
from kvscope.planner.sizes import format_bytes

GIB = 1024**3


def measure_point(model, batch: int, context: int, new_tokens: int, vocab: int) -> dict:
    """One generate() call; returns peaks, or the OOM and where it struck."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ids = torch.randint(0, vocab, (batch, context), device="cuda")
    mask = torch.ones_like(ids)
    row = {"batch": batch, "context": context, "new_tokens": new_tokens}
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        row.update(oom=False, generated=int(out.shape[1] - context))
        del out
    except torch.OutOfMemoryError as exc:
        row.update(oom=True, error=str(exc).split(". ")[0][:160])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["measured_peak"] = torch.cuda.max_memory_allocated()
    row["measured_reserved"] = torch.cuda.max_memory_reserved()
    row["baseline_allocated"] = base
    del ids, mask
    gc.collect()
    torch.cuda.empty_cache()
    return row


def grid(spec, capacity: int, quick: bool) -> list[tuple[int, int, int]]:
    """Points around the predicted boundary for several prompt lengths, plus decode-heavy points."""
    points = set()
    contexts = [512, 2048, 8000] if quick else [512, 1024, 2048, 4096, 8000]
    for c in contexts:
        w = Workload(batch=1, context=c, new_tokens=4)
        edge = plan(spec, w, gpu_memory=capacity, advice=False).max_batch
        for f in ((0.5, 0.9, 1.0, 1.1) if quick else (0.05, 0.25, 0.5, 0.8, 0.9, 0.97, 1.0, 1.03, 1.1, 1.3)):
            points.add((max(1, round(edge * f)), c, 4))
        points.add((1, c, 4))
    points.update({(1, 4096, 64), (8, 2048, 64), (16, 256, 512), (64, 128, 256)})
    return sorted(points, key=lambda p: (p[1], p[0], p[2]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--out", default="out/planner_accuracy.json")
    ap.add_argument("--docs", default=None, help="benchmarks markdown to update (default: docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the section from a saved run")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
        data = measure(args)
    md = render(data)
    write_section("planner-accuracy", md, **({"path": args.docs} if args.docs else {}))
    print(md)


def measure(args) -> dict:
    """Facts of the device and the model, then every grid point (saved to --out after each)."""
    data = {"meta": {**run_meta(), "model": args.model}, "facts": {}, "rows": []}
    _, total = torch.cuda.mem_get_info()
    torch.zeros(1, device="cuda")
    model, _, spec = load(args.model, random_weights=True, device="cuda", dtype="bf16")
    weights = torch.cuda.memory_allocated()
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    before_gemm = torch.cuda.memory_allocated()
    (a @ a.T).sum().item()
    workspace = torch.cuda.memory_allocated() - before_gemm
    del a
    free1, _ = torch.cuda.mem_get_info()
    data["facts"] = {"total_memory": total, "weights_allocated": weights, "weights_planned": spec.weights_bytes("bf16"),
                     "cublas_workspace_allocated": workspace,
                     "cuda_context_bytes": total - free1 - torch.cuda.memory_reserved()}
    print(data["facts"], flush=True)
    for batch, context, new in grid(spec, total, args.quick):
        row = measure_point(model, batch, context, new, spec.vocab_size)
        p = plan(spec, Workload(batch=batch, context=context, new_tokens=new), gpu_memory=total, advice=False)
        row.update(predicted_peak=p.peak_bytes, predicted_needed=p.needed_bytes, predicted_fits=p.fits,
                   peak_phase=p.peak_phase)
        if not row["oom"]:
            row["error_pct"] = round(100 * (p.peak_bytes - row["measured_peak"]) / row["measured_peak"], 2)
        row["fits_right"] = p.fits == (not row["oom"])
        data["rows"].append(row)
        print({k: row[k] for k in row if k != "error"}, flush=True)
        save_json(data, args.out)
    return data


def render(data: dict) -> str:
    meta, facts, rows = data["meta"], data["facts"], data["rows"]
    ran = [r for r in rows if not r["oom"]]
    worst = max((abs(r["error_pct"]) for r in ran), default=float("nan"))
    fits_right = sum(r["fits_right"] for r in rows)
    cells = [{**r, "measured": "OOM" if r["oom"] else f"{r['measured_peak'] / GIB:.2f}",
              "reserved": f"{r['measured_reserved'] / GIB:.2f}", "predicted": f"{r['predicted_peak'] / GIB:.2f}",
              "err": "" if r["oom"] else f"{r['error_pct']:+.2f}%", "fits": "yes" if r["predicted_fits"] else "no",
              "right": "yes" if r["fits_right"] else "**no**"} for r in rows]
    path, rebuild = render_command("planner_accuracy", "planner-accuracy")
    md = section_head(f"Planner accuracy: `{meta['model']}` with plain transformers generate()", meta, path, rebuild,
                      "planner-accuracy")
    md += (f"Random bf16 weights, default `DynamicCache`, sdpa, greedy, no padding. Weights allocated "
           f"{facts['weights_allocated']:,} bytes (planned {facts['weights_planned']:,}); CUDA context outside "
           f"PyTorch's counters {format_bytes(facts['cuda_context_bytes'])}; cuBLAS workspace allocated on the first "
           f"GEMM {format_bytes(facts['cublas_workspace_allocated'])}.\n\n")
    md += (f"Worst error of predicted vs measured peak `max_memory_allocated()` over {len(ran)} points that ran: "
           f"**{worst:.2f}%**; `fits` right at **{fits_right} of {len(rows)}** points.\n\n")
    return md + table(cells, [("batch", "batch"), ("context", "prompt"), ("new_tokens", "new"),
                              ("measured", "measured GiB"), ("reserved", "reserved GiB"),
                              ("predicted", "predicted GiB"), ("err", "error"), ("peak_phase", "phase"),
                              ("fits", "predicted fits"), ("right", "fits right"), ("seconds", "s")])


if __name__ == "__main__":
    main()
