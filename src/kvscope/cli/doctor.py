"""Reproduce a workload under the monitor, explain any out-of-memory (or KV budget overflow) with figures, rank the
fixes, optionally apply the best one, and write report.json + report.html (+ the allocator snapshot) to --out.
Exit code 0: the workload ran, or the applied fix made it run; 3: it failed and no fix made it run."""

from __future__ import annotations

from kvscope.cli import commands, common, output

HELP = "run a workload, diagnose OOMs and KV overflows, rank and apply fixes, write an HTML report"
PARENTS = ("model", "cache", "runtime", "emulate")  # --gpu-memory on the CPU: what the planner's figures compare with


def add_arguments(p) -> None:
    p.add_argument("--batch", type=int, required=True, help="sequences per batch")
    p.add_argument("--context", type=int, required=True, help="prompt length in tokens (random token ids)")
    p.add_argument("--new-tokens", type=int, required=True, help="tokens to generate")
    p.add_argument("--fix", action="store_true", help="apply the best fix, re-run, and report the outcome")
    common.add_out_arguments(p, default="kvscope-report", what="report.html, report.json and the memory snapshot")
    output.add_format(p)


def run(args) -> int:
    from kvscope.doctor import doctor
    from kvscope.errors import EXIT_DOES_NOT_FIT, EXIT_INTERNAL
    from kvscope.report import check_out_dir

    check_out_dir(args.out, force=args.force)
    w = common.measured_workload(args)
    loaded = common.load_model(args)
    with output.progress() as bar:
        task = bar.add_task("running under the monitor", total=None)

        def on_progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        result = doctor(loaded, w, fix=args.fix, out=args.out, force=args.force,
                        command=commands.render("doctor", args), progress=on_progress,
                        fix_command=lambda f: fix_command(args, f))
    payload = {**result.report.to_dict(), "paths": result.paths}
    output.emit(payload, args.format, render)
    if result.status == "ok" or result.fixed:
        return 0
    return EXIT_INTERNAL if result.report.outcome.detail == "error" else EXIT_DOES_NOT_FIT


def fix_command(args, fix) -> str:
    """The doctor command that applies `fix` (its report in a directory of its own: --out must be new); a fix the doctor
    cannot run (more GPUs) is checked with `kvscope plan`."""
    changes = dict(fix.changes or {}, out=f"{args.out.rstrip('/')}-fix{fix.rank}")
    if "tp" in changes:
        changes.pop("out")
        return _plan_command(args, changes)
    if "gpu" in changes:
        from kvscope.planner.gpus import gpu

        changes["gpu_memory"] = commands.size_text(gpu(changes.pop("gpu")).memory_bytes)
    if changes.get("policy") == common.policy_name(args):
        changes.pop("policy")
    elif "policy" in changes:
        changes["policy_knob"] = None  # the knobs were the old policy's
    return commands.render("doctor", args, **commands.dests(changes))


def _plan_command(args, changes: dict) -> str:
    from kvscope.cli.main import command_parser

    plan_args = command_parser("plan").parse_args([args.model])
    for dest in ("batch", "context", "new_tokens", "dtype", "kv_dtype", "weights", "runtime", "budget", "chunk_size",
                 "policy", "policy_knob", "gpu_memory"):
        setattr(plan_args, dest, getattr(args, dest))
    return commands.render("plan", plan_args, **commands.dests(changes))


def render(d: dict) -> None:
    from rich.table import Table

    g = output.gib
    o, diag = d["outcome"], d["diagnosis"]
    out = output.stdout
    out.print(f"[bold]{diag['headline']}[/bold]", highlight=False)
    out.print(diag["explanation"], markup=False, highlight=False)
    out.print(output.kv_table("figures", [(f["label"], _figure(f)) for f in diag.get("figures", [])]))
    rows = [("status", o["detail"]), ("device", d["device"]["name"] + (" (emulated capacity)" if d["device"]["emulated"]
                                                                       else "")),
            ("capacity", g(d["device"]["capacity_bytes"])),
            ("predicted peak (+overhead)",
             f"{g(d['prediction']['peak_bytes'])} (+{g(d['prediction']['overhead_bytes'])})"),
            ("measured peak allocated", g(o["peak_allocated_bytes"])), ("peak process RSS", g(o["peak_rss_bytes"])),
            ("KV cache allocated", g(o["kv_bytes"])), ("evicted tokens (all layers, whole batch)", o["evicted_tokens"]),
            ("seconds", o["seconds"])]
    out.print(output.kv_table("outcome", rows))
    att = d["attribution"]
    out.print(output.kv_table("attribution", [(k.replace("_", " "), g(v)) for k, v in att.items()]))
    if d["fixes"]:
        t = Table(title="fixes, cheapest first", title_justify="left")
        for col in ("#", "option", "estimate", "fits", "what it costs"):
            t.add_column(col)
        for f in d["fixes"]:
            t.add_row(str(f["rank"]), f["option"], f"{g(f['estimate_bytes'])} {f['estimate_of']}",
                      "yes" if f["fits"] else "no", f["message"])
        out.print(t)
        for f in d["fixes"]:
            if f.get("command"):
                out.print(f"  {f['rank']}. {f['command']}", markup=False, highlight=False)
    fo = d.get("fix_outcome")
    if fo:
        c = fo["check"]
        verdict = "as estimated" if c["agrees"] else "NOT as estimated: " + "; ".join(c["problems"])
        out.print(f"applied: {fo['applied']} -> {fo['detail']}, {c['what']} {g(c['measured_bytes'])} (estimate "
                  f"{g(c['estimate_bytes'])}), {fo['evicted_tokens']} tokens evicted; {verdict}", markup=False,
                  highlight=False)
    for note in d.get("notes", []):
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(f"report: {d['paths'].get('html')}", markup=False, highlight=False)


def _figure(f: dict) -> str:
    value = output.gib(f["bytes"]) if f.get("bytes") is not None else "-"
    if f.get("tokens") is not None:
        value = f"{f['tokens']:,} tokens" + (f" ({value})" if f.get("bytes") is not None else "")
    return value + (f"  {f['detail']}" if f.get("detail") else "")
