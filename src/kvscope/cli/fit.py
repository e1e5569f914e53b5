"""Find by measurement the largest batch (or prompt length) that runs, starting from the planner's prediction and
bisecting; report measured against predicted. Exit code 3 when not even the smallest value runs."""

from __future__ import annotations

from kvscope.cli import common, output

HELP = "measure the largest batch or context that runs, starting from the planner's prediction"
PARENTS = ("model", "cache", "runtime", "emulate")


def add_arguments(p) -> None:
    p.add_argument("--dimension", choices=("batch", "context"), default="batch",
                   help="what to maximise: batch (default; needs a GPU) or context (prompt length)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch, when the context is searched (default 1)")
    p.add_argument("--context", type=int, default=2048, help="prompt length in tokens, when the batch is searched "
                   "(default 2048; unused with --dimension context)")
    common.add_new_tokens(p, 16)
    output.add_format(p)


def run(args) -> int:
    from kvscope.doctor.fit import fit
    from kvscope.errors import EXIT_DOES_NOT_FIT

    if args.dimension == "context":
        args.context = 1  # the search sets the prompt length; a --context given would only be checked in vain
    w = common.measured_workload(args)
    loaded = common.load_model(args)

    def on_probe(p):
        output.stderr.print(f"  {args.dimension} {p.value}: {p.status} ({p.seconds} s)", highlight=False)

    result = fit(loaded, w, dimension=args.dimension, on_probe=on_probe)
    output.emit(result.to_dict(), args.format, render)
    return EXIT_DOES_NOT_FIT if result.measured == 0 else 0


def render(d: dict) -> None:
    from rich.table import Table

    err = d["error"]
    measured = d["measured"]
    if d["ceiling_reached"]:
        measured = f"at least {measured} (the top of the search: every probe up to it ran)"
    elif measured == 0:
        measured = f"none: even {d['dimension']} 1 did not run"
    output.stdout.print(output.kv_table(f"largest {d['dimension']}", [
        ("measured", measured), ("predicted by the planner", d["predicted"]),
        ("prediction error", "-" if err is None else f"{err:+.1%}"), ("runs", d["runs"])]))
    t = Table(title="probes, in order", title_justify="left")
    for col in (d["dimension"], "status", "peak allocated", "seconds"):
        t.add_column(col)
    for p in d["probes"]:
        t.add_row(str(p["value"]), p["status"], output.gib(p["peak_allocated_bytes"]), str(p["seconds"]))
    output.stdout.print(t)
