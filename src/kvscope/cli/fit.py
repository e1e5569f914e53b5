"""Find by measurement the largest batch (or prompt length) that runs, starting from the planner's prediction and
bisecting; report measured against predicted."""

from __future__ import annotations

from kvscope.cli import common, output
from kvscope.planner.workload import RUNTIMES

HELP = "measure the largest batch or context that runs, starting from the planner's prediction"


def add_arguments(p) -> None:
    common.add_model_arguments(p)
    p.add_argument("--dimension", choices=("batch", "context"), default="batch", help="what to maximise")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=16)
    common.add_cache_arguments(p, default_policy="full")
    p.add_argument("--runtime", choices=RUNTIMES, default="hf")
    p.add_argument("--gpu-memory", metavar="SIZE", help="emulate a GPU of this size on a larger one")
    output.add_format(p)


def run(args) -> int:
    from kvscope.doctor.fit import fit

    w = common.measured_workload(args)
    loaded = common.load_model(args)

    def on_probe(p):
        output.stderr.print(f"  {args.dimension} {p.value}: {p.status} ({p.seconds} s)", highlight=False)

    result = fit(loaded, w, dimension=args.dimension, policy=args.policy, gpu_memory=args.gpu_memory,
                 on_probe=on_probe)
    output.emit(result.to_dict(), args.format, render)
    return 0


def render(d: dict) -> None:
    from rich.table import Table

    err = d["error"]
    output.stdout.print(output.kv_table(f"largest {d['dimension']}", [
        ("measured", d["measured"]), ("predicted by the planner", d["predicted"]),
        ("prediction error", "-" if err is None else f"{err:+.1%}"), ("runs", d["runs"])]))
    t = Table(title="probes, in order", title_justify="left")
    for col in (d["dimension"], "status", "peak allocated", "seconds"):
        t.add_column(col)
    for p in d["probes"]:
        t.add_row(str(p["value"]), p["status"], output.gib(p["peak_allocated_bytes"]), str(p["seconds"]))
    output.stdout.print(t)
