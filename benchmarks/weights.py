"""Weight formats (int8, fp8, int4 through torchao) against dense weights: what they free, what they cost.

    python -m benchmarks.weights --parts cpu     # embedded SmolLM2-135M on the CPU: perplexity, passkey at 2k
    python -m benchmarks.weights --parts gpu     # the llama-3.1-8b shape on a CUDA GPU (random bf16 weights)
    python -m benchmarks.weights --render        # rewrite the sections weights-cpu and weights-cuda from docs/data

cpu: for every format that runs on the CPU (and the dense fp32 model), perplexity on the same text and with the same
measure as the KV-dtype rows of the quality section (the first 2048 tokens of the story, `ppl stream`: chunks of 64
through a full cache, tokens N/2+1 .. N-1) and passkey retrieval on the same six 2k cases (benchmarks.quality_cases,
seed 0), with kvscope's runtime and a full cache. A format that does not run on the CPU is listed with the reason.

gpu: per format, in one process, dense bf16 first: the weights' bytes by `torch.cuda.memory_allocated()` after the
load (from a clean allocator) against the planner; decode tokens/s at batch 1 and 32 (1k prompts, kvscope's runtime,
CUDA graphs, timed as benchmarks.runtime times it); the largest batch of 4096-token prompts + 16 new tokens the
planner gives (kvscope runtime, bf16 KV, full cache) and one measured run at that batch. The JSON is rewritten after
each format, so a run cut short keeps what it measured; `--deadline` skips the measured capacity runs that would not
fit in the time left.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from benchmarks.common import (
    ROOT,
    clean,
    command_line,
    commit,
    device_line,
    further_runs,
    save_json,
    section_head,
    table,
)
from benchmarks.common import write_section as _write_section

DATA = ROOT / "docs" / "data"
CPU_FILE, CUDA_FILE = "weights-cpu.json", "weights-cuda.json"
FORMATS = ("int8", "fp8", "int4")


def _meta(args) -> dict:
    return {"device": device_line(), "date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": args.command}


# --- cpu -------------------------------------------------------------------------------------------------------------
def part_cpu(args) -> dict:
    from benchmarks.quality_cases import passkey_cases, perplexity_ids
    from benchmarks.quality_runners import kv_dtype_passkey, ppl_stream
    from kvscope.errors import UsageError
    from kvscope.models import load
    from kvscope.models.quantize import check_runnable, model_bytes

    out = {"meta": _meta(args), "model": "smollm2-135m", "device": "CPU", "dtype": "fp32", "ppl_tokens": 2048,
           "ppl_chunk": 64, "rows": [], "not_runnable": {}}
    tok = None
    for fmt in ("dense", *FORMATS):
        weights = None if fmt == "dense" else fmt
        if weights:
            try:
                check_runnable(weights, "cpu")
            except UsageError as exc:
                out["not_runnable"][fmt] = exc.cli_message()
                _save(args, CPU_FILE, out)
                continue
        t = time.perf_counter()
        model, tok, spec = load("smollm2-135m", dtype="fp32", device="cpu", weights=weights)
        ids = perplexity_ids(tok, 2048)
        cases = passkey_cases(tok, [2048], (0.1, 0.5, 0.9), 2, seed=0)
        with torch.inference_mode():
            ppl = ppl_stream(model, ids, "full", len(ids) + 64, 64)
            rows, note = kv_dtype_passkey(model, tok, cases, None, 10)
        passed = sum(1 for r in rows if r.get("found"))
        row = {"weights": fmt, "perplexity": round(float(torch.tensor(ppl["nll_sum"] / ppl["tokens"]).exp()), 4),
               "nll_sum": ppl["nll_sum"], "tokens": ppl["tokens"], "passkey_2k": f"{passed}/{len(cases)}",
               "passkey_ok": passed, "passkey_cases": len(cases), "note": note,
               "weights_bytes": model_bytes(model) - sum(b.numel() * b.element_size() for b in model.buffers()),
               "planned_bytes": spec.weights_bytes("fp32", weights=weights), "seconds": round(time.perf_counter() - t)}
        out["rows"].append(row)
        print("cpu", row, flush=True)
        _save(args, CPU_FILE, out)
        del model
        clean()
    return out


# --- gpu -------------------------------------------------------------------------------------------------------------
PREFILL_BATCH = 8  # prompts of the prefill timing: 32k tokens, long enough for the products to dominate


def part_gpu(args) -> dict:
    from kvscope.models import load
    from kvscope.models.spec import ModelSpec
    from kvscope.planner import Workload, plan, search

    start = time.monotonic()
    spec = ModelSpec.from_catalogue(args.model)
    total = torch.cuda.get_device_properties(0).total_memory
    out = {"meta": _meta(args), "model": args.model, "device": torch.cuda.get_device_name(0), "total_bytes": total,
           "decode_context": 1024, "decode_new": args.new, "capacity_context": 4096, "capacity_new": 16,
           "formats": {}, "decode": {}}
    for fmt in ("bf16", *args.formats.split(",")):
        weights = None if fmt == "bf16" else fmt
        row: dict = {}
        out["formats"][fmt] = row
        base = clean()
        t = time.perf_counter()
        try:
            model, _, _ = load(args.model, random_weights=True, device="cuda", dtype="bf16", weights=weights)
        except Exception as exc:  # noqa: BLE001 - one format failing must not lose the others
            row["error"] = f"load: {type(exc).__name__}: {exc}"[:400]
            _save(args, CUDA_FILE, out)
            continue
        row["load_s"] = round(time.perf_counter() - t, 1)
        allocated = clean() - base
        planned = spec.weights_bytes("bf16", weights=weights)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        row.update(allocated_bytes=allocated, planned_bytes=planned, buffers_bytes=buffers,
                   error_pct=round(100 * (allocated - planned - buffers) / planned, 3))
        print("gpu bytes", fmt, row, flush=True)
        _save(args, CUDA_FILE, out)
        row["decode"] = {}
        if not args.no_decode:
            for batch in (1, 32):
                row["decode"][str(batch)] = _decode(model, spec, batch, args.new)
                print("gpu decode", fmt, batch, row["decode"][str(batch)], flush=True)
                _save(args, CUDA_FILE, out)
            row["prefill"] = _prefill(model, spec, PREFILL_BATCH, 4096)
            print("gpu prefill", fmt, row["prefill"], flush=True)
            _save(args, CUDA_FILE, out)
        w = Workload(batch=1, context=4096, new_tokens=16, runtime="kvscope", policy="full", weights=weights)
        predicted = search.max_batch(spec, w, total)
        row["capacity"] = {"predicted": predicted}
        left = args.deadline - (time.monotonic() - start)
        if fmt not in args.capacity_formats.split(","):
            row["capacity"]["skipped"] = "not in --capacity-formats"
        elif left < args.capacity_seconds:
            row["capacity"]["skipped"] = f"{left:.0f} s left of --deadline {args.deadline}"
        else:
            probes = _capacity_probes(model, spec, args.capacity_start or predicted, args, start)
            row["capacity"].update(probes[0])
            row["capacity"]["probes"] = probes
            row["capacity"]["planned_peak"] = plan(spec, w.with_(batch=probes[0]["batch"]), gpu_memory=total,
                                                   advice=False).peak_bytes
        print("gpu capacity", fmt, row["capacity"], flush=True)
        _save(args, CUDA_FILE, out)
        del model
        clean()
    return out


def _decode(model, spec, batch: int, new: int) -> dict:
    """kvscope's runtime decode (CUDA graphs where the step can be captured) as benchmarks.runtime times it."""
    from benchmarks.runtime import kvscope_decode

    ids = torch.randint(10, spec.vocab_size, (batch, 1024), device="cuda")
    for mode in ("auto", "forward"):
        try:
            r = kvscope_decode(model, ids, new, decode=mode)
            return {"tps": round(r["decode_tps"], 1), "decode": mode, "peak_over_base": r["peak_over_base"]}
        except Exception as exc:  # noqa: BLE001 - a step that cannot be captured falls back to the model's forward
            error = f"{mode}: {type(exc).__name__}: {exc}"[:300]
            clean()
    return {"tps": None, "error": error}


def _prefill(model, spec, batch: int, context: int) -> dict:
    """Prefill tokens/s of `batch` prompts of `context` tokens through kvscope's runtime (its default chunks), the
    second of two runs (the first compiles and warms the allocator)."""
    from kvscope.cache import BudgetedCache
    from kvscope.runtime import generate

    ids = torch.randint(10, spec.vocab_size, (batch, context), device="cuda")
    try:
        for _ in range(2):
            clean()
            cache = BudgetedCache(model, "full", budget_tokens=context + 1)
            seconds = generate(model, ids, cache, max_new_tokens=1).prefill_seconds
            cache = None
    except Exception as exc:  # noqa: BLE001 - one format failing must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        ids = cache = None
        clean()
    return {"batch": batch, "context": context, "seconds": round(seconds, 3),
            "tps": round(batch * context / seconds, 1)}


def _capacity_probes(model, spec, first: int, args, start: float) -> list[dict]:
    """The planner's batch (or `--capacity-start`), then (`--capacity-probes`) one less after an OOM, one more after a
    run that fits, until a batch that fits sits next to one that does not, or the probes or the deadline run out."""
    probes = [_capacity_run(model, spec, first)]
    while len(probes) < args.capacity_probes and args.deadline - (time.monotonic() - start) > args.capacity_seconds:
        tried = {p["batch"]: p["ok"] for p in probes}
        fits = [b for b, ok in tried.items() if ok]
        fails = [b for b, ok in tried.items() if not ok]
        if fits and fails and min(fails) == max(fits) + 1:
            break
        batch = max(fits) + 1 if fits and not fails else (min(fails) - 1)
        if batch < 1:
            break
        probes.append(_capacity_run(model, spec, batch))
        print("gpu capacity probe", probes[-1], flush=True)
    return probes


def _capacity_run(model, spec, batch: int) -> dict:
    """One generation of `batch` 4096-token prompts + 16 new tokens: whether it fits, its allocated and reserved
    peaks, and for an OOM the phase it reached and what the allocator held then (reserved, allocated, and the free
    bytes inside split blocks: fragmentation)."""
    from kvscope.cache import BudgetedCache
    from kvscope.runtime import generate

    base = clean()
    t = time.perf_counter()
    seen = {"phase": "setup"}
    try:
        ids = torch.randint(10, spec.vocab_size, (batch, 4096), device="cuda")
        cache = BudgetedCache(model, "full", budget_tokens=4096 + 16)
        generate(model, ids, cache, max_new_tokens=16, on_phase=lambda phase, *_: seen.update(phase=phase))
        torch.cuda.synchronize()
        result = {"ok": True, "peak": torch.cuda.max_memory_allocated(), "baseline": base,
                  "peak_reserved": torch.cuda.max_memory_reserved()}
    except torch.OutOfMemoryError as exc:
        stats = torch.cuda.memory_stats()
        result = {"ok": False, "error": str(exc).split("\n")[0][:200], "phase": seen["phase"],
                  "reserved_at_oom": stats.get("reserved_bytes.all.current"),
                  "allocated_at_oom": stats.get("allocated_bytes.all.current"),
                  "inactive_split_at_oom": stats.get("inactive_split_bytes.all.current")}
    finally:
        ids = cache = None
        clean()
    return {**result, "batch": batch, "seconds": round(time.perf_counter() - t, 1)}


def _save(args, name: str, data: dict) -> None:
    if name == CUDA_FILE:
        data["decode"] = {f: {b: d["tps"] for b, d in r.get("decode", {}).items() if d.get("tps")}
                          for f, r in data["formats"].items()}
    save_json(data, Path(args.out) / name)


# --- render ----------------------------------------------------------------------------------------------------------
def render(directory: Path = DATA) -> list[str]:
    written = []
    rebuild = "python -m benchmarks.weights --render"
    if (directory / CPU_FILE).exists():
        d = json.loads((directory / CPU_FILE).read_text())
        dense = next((r for r in d["rows"] if r["weights"] == "dense"), None)
        rows = [{**r, "vs": f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.2f}%" if dense else "",
                 "saved": f"{100 * (1 - r['weights_bytes'] / dense['weights_bytes']):.0f}%" if dense else ""}
                for r in d["rows"]]
        md = section_head("Weight formats on the CPU: perplexity and passkey (embedded SmolLM2-135M)", d["meta"],
                          f"docs/data/{CPU_FILE}", rebuild, "weights-cpu")
        md += ("fp32 model; `dense` is the model as loaded. Perplexity: the KV-dtype rows' text and measure (first "
               f"{d['ppl_tokens']} tokens of the story, chunks of {d['ppl_chunk']} through a full cache, tokens N/2+1 "
               ".. N-1). Passkey: the six 2k cases of the quality section, kvscope's runtime, full cache. Weights: "
               "the bytes of the parameters as torchao holds them (planned = `kvscope plan`). A weight format frees "
               "weight memory, which can then hold more KV; it does not shrink the KV cache.\n\n")
        md += table(rows, [("weights", "weights"), ("perplexity", "perplexity"), ("vs", "vs dense"),
                           ("passkey_2k", "passkey 2k"), ("weights_bytes", "weight bytes"),
                           ("planned_bytes", "planned"), ("saved", "saved"), ("seconds", "seconds")])
        for fmt, why in d.get("not_runnable", {}).items():
            md += f"\n- {fmt}: not run on the CPU: {why}\n"
        _write_section("weights-cpu", md)
        written.append("weights-cpu")
    if (directory / CUDA_FILE).exists():
        more = {f.name: json.loads(f.read_text()) for f in sorted(directory.glob("weights-cuda.*.json"))}
        _write_section("weights-cuda", _render_cuda(json.loads((directory / CUDA_FILE).read_text()), more))
        written.append("weights-cuda")
    return written


def _capacity_cell(cap: dict) -> str:
    probes = cap.get("probes", [])
    if len(probes) > 1:  # the first probe is the planner's batch: its planned peak goes with it
        first = {**probes[0], "planned_peak": cap["planned_peak"]} if "planned_peak" in cap else probes[0]
        return "; ".join(f"{p['batch']}: {_probe_cell(p)}" for p in [first, *probes[1:]])
    return _probe_cell(cap)


def _probe_cell(cap: dict) -> str:
    if cap.get("ok"):
        if "peak" not in cap:
            return "ran"
        parts = [f"peak {cap['peak'] / 2**30:.2f} GiB"]
        if cap.get("peak_reserved"):
            parts.append(f"reserved {cap['peak_reserved'] / 2**30:.2f} GiB")
        if "planned_peak" in cap:
            error = 100 * (cap["planned_peak"] - cap["peak"]) / cap["peak"]
            parts.append(f"planned {cap['planned_peak'] / 2**30:.2f} GiB ({error:+.2f}%)")
        return "ran, " + ", ".join(parts)
    if cap.get("ok") is False:
        asked = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", cap.get("error", ""))
        if not (cap.get("phase") and asked):  # an older record: its message as it was kept
            return f"OOM: {cap.get('error', '')}"
        held = (f" (reserved {cap['reserved_at_oom'] / 2**30:.2f} GiB, allocated {cap['allocated_at_oom'] / 2**30:.2f})"
                if cap.get("reserved_at_oom") else "")
        return f"OOM in {cap['phase']} asking for {asked.group(1)}{held}"
    if "skipped" in cap:
        return f"not run ({cap['skipped']})"
    return "not measured"


def _render_cuda(d: dict, more: dict[str, dict] | None = None) -> str:
    """The section: the main run's table, then each further run (`weights-cuda.<name>.json`, with its own bf16 row:
    ratios are within one run)."""
    return _cuda_head(d) + _cuda_table(d) + further_runs(more or {}, _cuda_table, ", ratios against its own bf16 row")


def _cuda_head(d: dict) -> str:
    md = section_head(f"Weight formats on the GPU: bytes, decode speed, capacity ({d['model']}, random bf16 weights)",
                      d["meta"], f"docs/data/{CUDA_FILE}", "python -m benchmarks.weights --render", "weights-cuda")
    md += ("One process, dense bf16 first. Bytes: `torch.cuda.memory_allocated()` after the load from a clean "
           "allocator, less the model's buffers (RoPE), against `kvscope plan`. Decode: kvscope's runtime, "
           f"{d['decode_context']}-token prompts, {d['decode_new']} steps timed after the CUDA graphs are captured, "
           f"tokens/s per sequence. Capacity: the planner's largest batch of {d['capacity_context']}-token prompts + "
           f"{d['capacity_new']} new tokens (kvscope runtime, bf16 KV, full cache), and the runs measured from it "
           "(with more than one, each batch tried and what it did).\n\n")
    return md


def _cuda_table(d: dict) -> str:
    base = d["formats"].get("bf16", {}).get("decode", {})
    rows = []
    for fmt, r in d["formats"].items():
        dec = r.get("decode", {})
        cap = r.get("capacity", {})

        def speed(b: str, dec=dec, fmt=fmt) -> str:
            tps, ref = dec.get(b, {}).get("tps"), base.get(b, {}).get("tps")
            if not tps:
                return dec.get(b, {}).get("error", "not measured")
            return f"{tps}" + (f" ({tps / ref:.2f}x)" if ref and fmt != "bf16" else "")

        ran = _capacity_cell(cap)
        rows.append({"fmt": fmt, "alloc": f"{r.get('allocated_bytes', 0):,}",
                     "planned": f"{r.get('planned_bytes', 0):,}",
                     "err": f"{r['error_pct']:+.3f}%" if "error_pct" in r else r.get("error", ""),
                     "b1": speed("1"), "b32": speed("32"), "prefill": _prefill_cell(r, d),
                     "batch": cap.get("predicted", "not measured"), "ran": ran})
    return table(rows, [("fmt", "weights"), ("alloc", "allocated bytes"), ("planned", "planned bytes"),
                             ("err", "error"), ("b1", "decode tok/s, batch 1"), ("b32", "batch 32"),
                             ("prefill", f"prefill tok/s, {PREFILL_BATCH} x 4k"),
                             ("batch", "largest batch at 4k (planner)"), ("ran", "measured at it")])


def _prefill_cell(r: dict, d: dict) -> str:
    mine, base = r.get("prefill", {}), d["formats"].get("bf16", {}).get("prefill", {})
    if not mine.get("tps"):
        return mine.get("error", "not measured")
    ratio = f" ({mine['tps'] / base['tps']:.2f}x)" if base.get("tps") and r is not d["formats"].get("bf16") else ""
    return f"{mine['tps']:,.0f}{ratio}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="cpu", help="cpu, gpu or cpu,gpu")
    p.add_argument("--out", default=str(DATA), help="directory for weights-cpu.json / weights-cuda.json")
    p.add_argument("--render", nargs="?", const=str(DATA), metavar="DIR",
                   help="only rewrite the sections from the JSON in DIR (default docs/data)")
    p.add_argument("--model", default="llama-3.1-8b", help="catalogue shape of the gpu part")
    p.add_argument("--formats", default="int4,int8,fp8", help="formats of the gpu part, after bf16")
    p.add_argument("--new", type=int, default=64, help="decode steps timed per run of the gpu part")
    p.add_argument("--deadline", type=float, default=220, help="seconds the gpu part may take (default 220)")
    p.add_argument("--capacity-formats", default="bf16,int4,int8,fp8",
                   help="formats whose capacity run is measured (int4 prefills slowly at a large batch: minutes)")
    p.add_argument("--capacity-seconds", type=float, default=40,
                   help="time left that a measured capacity run needs to start (default 40)")
    p.add_argument("--capacity-probes", type=int, default=1,
                   help="capacity runs per format: the planner's batch, then one less after an OOM or one more after "
                        "a fit, until the boundary shows (default 1)")
    p.add_argument("--capacity-start", type=int, default=None,
                   help="first batch of the capacity probes (default: the planner's largest), to go on from a run")
    p.add_argument("--no-decode", action="store_true", help="skip the decode timings (bytes and capacity only)")
    args = p.parse_args(argv)
    args.command = command_line()
    if args.render:
        print("sections written: " + ", ".join(render(Path(args.render))))
        return 0
    parts = args.parts.split(",")
    if set(parts) - {"cpu", "gpu"}:
        p.error("--parts: cpu, gpu or cpu,gpu")
    if "gpu" in parts and not torch.cuda.is_available():
        p.error("the gpu part needs a CUDA GPU")
    for part in parts:
        globals()[f"part_{part}"](args)
    if Path(args.out).resolve() == DATA.resolve():
        render()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
