"""Predict the GPU memory of a generation before running it: weights, KV cache, activations, logits, overhead;
whether it fits, the largest batch and context that do, and ranked fixes, each as a command that runs as printed.
With --check the exit code says whether it fits (0 fits, 3 does not)."""

from __future__ import annotations

from kvscope.cli import commands, common, output
from kvscope.kvformats import DTYPE_BYTES
from kvscope.planner.gpus import GPUS

HELP = "predict memory, fit, max batch/context and fixes for a workload"
# the policy is checked against the budget; the estimate prices what a budget allocates
PARENTS = ("runtime", "cache", "tp")


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="catalogue name (e.g. llama-3-8b), local model directory or .gguf "
                   "(only its config is read)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--gpu", help="GPU from the catalogue: " + ", ".join(GPUS) + " (default H100-80GB)")
    target.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory with its unit, e.g. 24GiB or 80GB")
    add_workload_arguments(p)
    p.add_argument("--check", action="store_true", help="exit with code 3 when the workload does not fit (0 when it "
                   "does), for scripts")
    output.add_format(p)


def add_workload_arguments(p) -> None:
    p.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--context", type=int, default=2048, help="prompt length in tokens (default 2048)")
    common.add_new_tokens(p, 128)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="weights and activations (default bf16)")
    common.add_weights_argument(p)


def workload_from(args):
    from kvscope.planner.sizes import parse_size
    from kvscope.planner.workload import Workload

    return Workload(batch=args.batch, context=args.context, new_tokens=args.new_tokens, dtype=args.dtype,
                    kv_dtype=args.kv_dtype, weights=args.weights, tp=args.tp, runtime=args.runtime,
                    budget_tokens=args.budget, chunk_size=common.chunk_size(args), recall=args.recall,
                    gpu_memory=parse_size(args.gpu_memory) if args.gpu_memory is not None else None)


def run(args) -> int:
    from kvscope.errors import EXIT_DOES_NOT_FIT
    from kvscope.models.loader import spec_for
    from kvscope.planner.plan import plan

    w = workload_from(args)
    common.check_runtime_options(args)
    if args.policy is not None or args.policy_knob:
        common.check_policy_args(args)
    result = plan(spec_for(args.model), w, gpu=args.gpu)
    payload = result.to_dict()
    for fix in payload["advice"]:
        fix["command"] = fix_command(args, fix["changes"])
    output.emit(payload, args.format, render)
    return EXIT_DOES_NOT_FIT if args.check and not result.fits else 0


def fix_command(args, changes: dict) -> str:
    """The plan command with a fix applied: `gpu` replaces `--gpu-memory` (they exclude each other)."""
    extra = {"gpu_memory": None} if "gpu" in changes else {}
    return commands.render("plan", args, **commands.dests(changes), **extra)


def render(d: dict) -> None:
    from rich.table import Table

    g = output.gib
    w = d["workload"]
    title = (f"{d['model']} on {d['gpu']}: batch {w['batch']} x {w['context']} prompt + {w['new_tokens']} new, "
             f"{w['weights'] or w['dtype']} weights, {w['kv_dtype']} KV, tp {w['tp']}, runtime {w['runtime']}")
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
    if d["host_bytes"]:
        rows.append(("recall tier, host memory at most", g(d["host_bytes"])))
    output.stdout.print(output.kv_table(title, rows))
    if d["advice"]:
        t = Table(title="Fixes, cheapest first", title_justify="left")
        for col in ("#", "fix", "option", "estimate", "trade-off"):
            t.add_column(col)
        for a in d["advice"]:
            t.add_row(str(a["rank"]), a["action"], a["option"], g(a["estimate_bytes"]), a["tradeoff"])
        output.stdout.print(t)
        output.stdout.print("Each fix as a command:", markup=False)
        for a in d["advice"]:
            output.stdout.print(f"  {a['rank']}. {a['command']}", markup=False, highlight=False, soft_wrap=True)
