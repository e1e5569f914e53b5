"""Reproduce a workload under the monitor, explain any out-of-memory (or KV budget overflow) with figures, rank the
fixes, optionally apply the best one, and write report.json + report.html (+ the allocator snapshot) to --out."""

from __future__ import annotations

import sys

from kvscope.cli import common, output
from kvscope.planner.workload import RUNTIMES

HELP = "run a workload, diagnose OOMs and KV overflows, rank and apply fixes, write an HTML report"


def add_arguments(p) -> None:
    common.add_model_arguments(p)
    p.add_argument("--batch", type=int, required=True, help="sequences per batch")
    p.add_argument("--context", type=int, required=True, help="prompt length in tokens (random token ids)")
    p.add_argument("--new-tokens", type=int, required=True, help="tokens to generate")
    common.add_cache_arguments(p, default_policy="full")
    p.add_argument("--runtime", choices=RUNTIMES, default="hf",
                   help="hf: plain transformers generate(); kvscope: chunked prefill into a BudgetedCache")
    p.add_argument("--gpu-memory", metavar="SIZE", help="emulate a GPU of this size (e.g. 24GiB) on a larger one")
    p.add_argument("--fix", action="store_true", help="apply the best fix, re-run, and report the outcome")
    p.add_argument("--out", default="kvscope-report", help="output directory (default ./kvscope-report)")
    output.add_format(p)


def run(args) -> int:
    from kvscope.doctor import doctor
    from kvscope.report import check_out_dir

    check_out_dir(args.out)
    w = common.measured_workload(args)
    loaded = common.load_model(args)
    with output.progress() as bar:
        task = bar.add_task("running under the monitor", total=None)

        def on_progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        result = doctor(loaded, w, policy=args.policy, gpu_memory=args.gpu_memory, fix=args.fix, out=args.out,
                        command="kvscope " + " ".join(sys.argv[1:]), progress=on_progress)
    payload = {**result.report, "paths": result.paths}
    output.emit(payload, args.format, render)
    return 0


def render(d: dict) -> None:
    from rich.table import Table

    g = output.gib
    o, diag = d["outcome"], d["diagnosis"]
    out = output.stdout
    out.print(f"[bold]{diag['headline']}[/bold]")
    out.print(diag["explanation"], markup=False, highlight=False)
    rows = [("status", o["detail"]), ("device", d["device"]["name"] + (" (emulated capacity)" if d["device"]["emulated"]
                                                                       else "")),
            ("capacity", g(d["device"]["capacity_bytes"])),
            ("predicted peak (+overhead)",
             f"{g(d['prediction']['peak_bytes'])} (+{g(d['prediction']['overhead_bytes'])})"),
            ("measured peak allocated", g(o["peak_allocated_bytes"])), ("peak process RSS", g(o["peak_rss_bytes"])),
            ("KV cache", g(o["kv_bytes"])), ("evicted tokens", o["evicted_tokens"]), ("seconds", o["seconds"])]
    out.print(output.kv_table("outcome", rows))
    att = d["attribution"]
    out.print(output.kv_table("attribution", [(k.replace("_", " "), g(v)) for k, v in att.items()]))
    if d["fixes"]:
        t = Table(title="fixes, cheapest first", title_justify="left")
        for col in ("#", "option", "estimate", "fits", "what it costs"):
            t.add_column(col)
        for f in d["fixes"]:
            t.add_row(str(f["rank"]), f["option"], g(f["peak_bytes"]), "yes" if f["fits"] else "no", f["message"])
        out.print(t)
    fo = d.get("fix_outcome")
    if fo:
        peak = g(fo["peak_allocated_bytes"] or fo["peak_rss_bytes"])
        out.print(f"applied: {fo['applied']} -> {fo['detail']}, peak {peak}, {fo['evicted_tokens']} tokens evicted",
                  markup=False)
    for note in d.get("notes", []):
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(f"report: {d['paths'].get('html')}", markup=False)
