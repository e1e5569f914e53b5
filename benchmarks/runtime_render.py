"""docs/benchmarks.md sections `runtime-<part>` from the JSON that `python -m benchmarks.runtime` saved."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.common import further_runs, section_head, table, write_section

GIB = 1024**3


def _decode(d: dict) -> str:
    md = (f"Limit: {d['weights_bytes'] / 1e9:.2f} GB of weights read per token at the measured device-to-device copy "
          f"rate of {d['copy_bandwidth_tbps']} TB/s = **{d['limit_tps']} tok/s** at batch 1. kvscope: kvscope's own "
          f"decode step captured in CUDA graphs ({d['new']} steps timed after the capture); eager: kvscope's runtime "
          "through the model's forward (the path before CUDA graphs); plain: `model.generate()` with its "
          "DynamicCache. GB/s counts weights + KV read per step.\n\n")
    md += "Tokens/s are per sequence (decode steps per second); total = per sequence x batch.\n\n"
    return md + table(d["rows"], [("batch", "batch"), ("context", "context"), ("plain_tps", "plain generate() tok/s"),
                                  ("eager_tps", "kvscope eager tok/s"), ("kvscope_tps", "kvscope graphs tok/s"),
                                  ("total_tps", "kvscope total tok/s"), ("speedup", "vs plain"),
                                  ("gbps", "achieved GB/s"),
                                  ("limit_pct", "% of the limit (batch 1)"), ("prefill_s", "prefill s")])


def _policies(d: dict) -> str:
    rounds = d.get("rounds", 1)
    md = (f"32,768-token prompt, budget 2048 tokens, `evict_batch=32`, {d['new']} decode steps timed after the "
          f"capture, against a `full` cache holding 2048 tokens; {rounds} interleaved round(s), medians.\n\n")
    rows = [{**r, "per_round": ", ".join(map(str, r.get("rounds", [])))} for r in d["rows"]]
    return md + table(rows, [("policy", "policy"), ("decode_tps", "decode tok/s"), ("vs_full", "vs full 2048"),
                             ("per_round", "tok/s per round"), ("prefill_s", "prefill s"),
                             ("evicted", "evicted tokens")])


def _capacity(d: dict, more: dict[str, dict] | None = None) -> str:
    md = (f"4,096-token prompts + {d['new']} new tokens. GPU {d['total_bytes']:,} bytes, weights "
          f"{d['weights_bytes']:,}, outside PyTorch (CUDA context) {d['outside_bytes']:,}; ideal = (GPU - weights - "
          "context) / KV bytes per token. Each probe is a real run; `exact` means the search bracketed the largest "
          "batch (it ran and the next one did not). In the probes: peak = `max_memory_allocated` over the baseline; "
          "planned = `kvscope plan` peak, weights included; planner error = planned against peak + baseline, the "
          "baseline being the weights, the model's buffers and the prompt's ids where the run recorded it, the "
          "weights alone in runs that did not.\n\n")
    return md + _capacity_runs(d) + further_runs(more or {}, lambda e: (
        f"GPU {e['total_bytes']:,} bytes, outside PyTorch {e['outside_bytes']:,}.\n\n" + _capacity_runs(e)))


def _capacity_runs(d: dict) -> str:
    rows = [{**r, "share": f"{100 * r['share_of_ideal']:.1f}%"} for r in d["runs"]]
    probes = [{"runtime": r["runtime"], "kv": r["kv_dtype"], **p, "err": _err(p, d["weights_bytes"])}
              for r in d["runs"] for p in r["probes"]]
    md = table(rows, [("runtime", "runtime"), ("kv_dtype", "KV"), ("measured", "largest batch"),
                      ("predicted", "planner"), ("tokens_in_flight", "tokens in flight"), ("share", "of ideal"),
                      ("exact", "exact")])
    md += "\nProbes:\n\n"
    return md + table(probes, [("runtime", "runtime"), ("kv", "KV"), ("batch", "batch"), ("ok", "ran"),
                               ("peak", "peak bytes"), ("planned_peak", "planned bytes"), ("err", "planner error"),
                               ("planned_fits", "planner: fits"), ("seconds", "s")])


def _err(p: dict, weights: int) -> str:
    if not p.get("peak"):
        return ""
    measured = p["peak"] + p.get("baseline", weights)
    return f"{(p['planned_peak'] - measured) / measured:+.2%}"


def _monitor(d: dict) -> str:
    return (f"Decode tok/s at batch 1 after an 8,192-token prompt, with and without a running `Monitor` (50 ms "
            "samples, phase marks and a KV snapshot every 8 steps, as the doctor does), interleaved rounds: "
            f"off {d['samples']['off']}, on {d['samples']['on']}; medians {d['median_off']:.1f} vs "
            f"{d['median_on']:.1f} tok/s, **{100 * d['slowdown']:.1f}% slower** with monitoring.\n")


def _profile(d: dict) -> str:
    md = (f"GPU time per decode step {d['gpu_us_per_step']} us over {d['steps']} replays (batch 1, 1k context, "
          "torch.profiler, CUDA activity), the kernels by total time:\n\n")
    return md + table(d["kernels"], [("kernel", "kernel"), ("calls", "calls"), ("total_us", "total us"),
                                     ("per_call_us", "us per call")])


def _cpu(d: dict) -> str:
    m = d["median"]
    return (f"Embedded SmolLM2-135M, fp32, {d['prompt']}-token prompt, {d['new']} decode steps timed, "
            f"{d['threads']} threads, interleaved rounds (samples: {d['samples']}). Medians: plain generate() "
            f"{m['plain']:.1f} tok/s, kvscope with the model's forward (the CPU default) {m['forward']:.1f} "
            f"({d['forward_vs_plain']}x), kvscope's own step {m['static']:.1f} ({d['static_vs_plain']}x).\n")


def _recall(d: dict, more: dict[str, dict] | None = None) -> str:
    """Interleaved rounds with and without the tier; the medians' ratio and peaks against budget + one chunk; then each
    further run the same way."""
    md = (f"A {d['context']:,}-token prompt in {d['chunk']}-token chunks under {d['policy']} at budget {d['budget']}, "
          "with and without `recall=\"cpu\"`, interleaved rounds. Peak: `max_memory_allocated` over the baseline "
          "(weights in the baseline): the cache's one allocation plus the prefill's temporaries. Budget + one chunk "
          "of bf16 KV is the store's share of that allocation. Ratio: the prefill with the tier over the one "
          "without in the same round.\n\n")
    if d.get("note"):
        md += f"Note: {d['note']}.\n\n"
    return md + _recall_rounds(d) + further_runs(more or {}, _recall_rounds)


def _recall_rounds(d: dict) -> str:
    by = {m: {r["round"]: r for r in d["rows"] if (r["recall"] or "none") == m} for m in ("none", "cpu")}
    rows = []
    for r in d["rows"]:
        other = by["none"].get(r["round"])
        ratio = f"{r['prefill_s'] / other['prefill_s']:.2f}x" if r["recall"] and other else ""
        rows.append({**r, "recall": r["recall"] or "none", "ratio": ratio,
                     "peak_gib": f"{r['peak_over_base'] / GIB:.3f}", "arena_gib": f"{r['arena_bytes'] / GIB:.3f}",
                     "kv_gib": f"{r['kv_store_bytes'] / GIB:.3f}"})
    md = table(rows, [("round", "round"), ("recall", "recall"), ("prefill_s", "prefill s"), ("ratio", "ratio"),
                      ("peak_gib", "peak over base GiB"), ("arena_gib", "cache allocation GiB"),
                      ("kv_gib", "budget + chunk KV GiB"), ("recalled", "recalled tokens")])
    if by["none"] and by["cpu"]:
        ratio = _median_ratio(by, by["cpu"])
        md += f"\n\nPrefill with recall / without (medians): **{ratio:.2f}x** (target at most 1.3x)"
        later = [k for k in by["cpu"] if k > 0 and k in by["none"]]
        if later:
            peak = max(by["cpu"][k]["peak_over_base"] - by["none"][k]["peak_over_base"] for k in later)
            md += (f"; after the first round {_median_ratio(by, later):.2f}x. Peak with the tier minus without, "
                   f"from the second round: {peak / 1024:+,.0f} KiB")
        md += ".\n"
    return md


def _median_ratio(by: dict, rounds) -> float:
    """The median prefill with the tier over the median without, over `rounds`."""
    return statistics.median(by["cpu"][k]["prefill_s"] for k in rounds if k in by["none"]) / statistics.median(
        by["none"][k]["prefill_s"] for k in rounds if k in by["cpu"])


TITLES = {"decode": ("Runtime decode speed: `llama-3.1-8b` shape, random bf16 weights", _decode),
          "policies": ("Runtime: eviction policies at budget 2048 after a 32k prompt", _policies),
          "capacity": ("Runtime capacity: tokens in flight before OOM, `llama-3.1-8b`", _capacity),
          "monitor": ("Runtime: cost of monitoring on decode", _monitor),
          "profile": ("Runtime: where a decode step's GPU time goes", _profile),
          "cpu": ("Runtime on the CPU: the embedded model against plain generate()", _cpu),
          "recall": ("Runtime: the recall tier's prefill time and memory at 32k", _recall)}


def render(directory: Path) -> None:
    for part, (title, body) in TITLES.items():
        path = directory / f"runtime-{part}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        data = f"docs/data/runtime-{part}.json"
        rebuild = "python -m benchmarks.runtime --render docs/data"
        head = section_head(title, d["meta"], data, rebuild, f"runtime-{part}")
        more = {f.name: json.loads(f.read_text()) for f in sorted(directory.glob(f"runtime-{part}.*.json"))}
        write_section(f"runtime-{part}", head + (body(d, more) if more else body(d)))
