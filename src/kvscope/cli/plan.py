"""Predict the GPU memory of a generation before running it: weights, KV cache, activations, logits, overhead;
whether it fits, the largest batch and context that do, and ranked fixes."""

from __future__ import annotations

from kvscope.cli import output
from kvscope.kvformats import DTYPE_BYTES, KV_FORMATS
from kvscope.planner.gpus import GPUS
from kvscope.planner.workload import DEFAULT_CHUNK, RUNTIMES

HELP = "predict memory, fit, max batch/context and fixes for a workload"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="catalogue name (e.g. llama-3-8b) or local model path")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--gpu", help="GPU from the catalogue: " + ", ".join(GPUS) + " (default H100-80GB)")
    target.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory, e.g. 24GiB or 80GB")
    add_workload_arguments(p)
    output.add_format(p)


def add_workload_arguments(p) -> None:
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--context", type=int, default=2048, help="prompt length in tokens (default 2048)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="weights and activations")
    p.add_argument("--kv-dtype", default=None, choices=list(KV_FORMATS), help="KV cache storage (default: --dtype)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (memory is per GPU)")
    p.add_argument("--runtime", default="hf", choices=RUNTIMES,
                   help="hf: plain transformers generate(); kvscope: chunked prefill into one preallocated cache")
    p.add_argument("--budget", type=int, default=None, help="KV budget in tokens per sequence (kvscope runtime)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="prefill chunk (kvscope runtime)")


def workload_from(args):
    from kvscope.planner.workload import Workload

    return Workload(batch=args.batch, context=args.context, new_tokens=args.new_tokens, dtype=args.dtype,
                    kv_dtype=args.kv_dtype, tp=args.tp, runtime=args.runtime, budget_tokens=args.budget,
                    chunk_size=args.chunk_size)


def run(args) -> int:
    from kvscope.models.loader import spec_for
    from kvscope.planner.plan import plan

    result = plan(spec_for(args.model), workload_from(args), gpu=args.gpu, gpu_memory=args.gpu_memory)
    output.emit(result.to_dict(), args.format, render)
    return 0


def render(d: dict) -> None:
    from rich.table import Table

    g = output.gib
    w = d["workload"]
    title = (f"{d['model']} on {d['gpu']}: batch {w['batch']} x {w['context']} prompt + {w['new_tokens']} new, "
             f"{w['dtype']} weights, {w['kv_dtype']} KV, tp {w['tp']}, runtime {w['runtime']}")
    rows = [
        ("weights", g(d["weights_bytes"])),
        ("KV cache", f"{g(d['kv_bytes'])}  ({d['kv_bytes_per_token']:,} B/token)"),
        ("activations", g(d["activation_bytes"])),
        ("logits", g(d["logits_bytes"])),
        ("workspaces", g(d["workspace_bytes"])),
        (f"peak allocated ({d['peak_phase']})", g(d["peak_bytes"])),
        ("overhead (CUDA context, allocator slack)", g(d["overhead_bytes"])),
        ("needed", g(d["needed_bytes"])),
        ("capacity", g(d["capacity_bytes"])),
        ("fits", "yes" if d["fits"] else "NO"),
        ("max batch at this context", d["max_batch"]),
        ("max context at this batch", d["max_context"]),
    ]
    output.stdout.print(output.kv_table(title, rows))
    if d["advice"]:
        t = Table(title="Fixes, cheapest first", title_justify="left")
        for col in ("#", "fix", "option", "estimate", "trade-off"):
            t.add_column(col)
        for a in d["advice"]:
            t.add_row(str(a["rank"]), a["action"], a["option"], g(a["estimate_bytes"]), a["tradeoff"])
        output.stdout.print(t)
