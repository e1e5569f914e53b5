"""The benchmarks as tools: `python -m benchmarks gpu ...` runs a GPU session, `python -m benchmarks render [DIR]`
writes docs/benchmarks.md from data. Each script also runs alone: `python -m benchmarks.<script> --help`.

    python -m benchmarks gpu --parts tests,runtime,kv_speed,planner,doctor --out DIR   # on the GPU machine
    python -m benchmarks render DIR      # here: DIR's data into docs/data, its sections rewritten
    python -m benchmarks render          # every section rebuilt from docs/data by the command it names
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from benchmarks import gpu

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gpu", help="run benchmark parts on the GPU machine, every output under --out",
                       description=gpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--parts", default="tests,runtime,kv_speed,planner,doctor",
                   help="comma list, run in order: " + ", ".join(gpu.PARTS))
    g.add_argument("--out", required=True, metavar="DIR", help="where every part's output goes")
    g.add_argument("--deadline", type=float, default=570, help="seconds the whole session may take (default 570)")
    g.add_argument("--part-args", action="append", default=[], metavar="PART:ARGS",
                   help="extra arguments of one part, e.g. 'runtime:--parts decode,policies' (repeatable)")
    r = sub.add_parser("render", help="write docs/benchmarks.md from data")
    r.add_argument("run_dir", nargs="?", metavar="DIR", help="a GPU session's --out to place in docs/data first")
    args = p.parse_args(argv)
    if args.command == "render":
        from benchmarks import render

        names = render.place(Path(args.run_dir)) if args.run_dir else render.rebuild()
        print("sections written: " + (", ".join(names) or "none"))
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in gpu.PARTS]
    if unknown:
        p.error(f"unknown part {', '.join(unknown)}; expected some of {', '.join(gpu.PARTS)}")
    extra: dict[str, list[str]] = {}
    for item in args.part_args:
        name, _, rest = item.partition(":")
        extra.setdefault(name, []).extend(rest.split())
    return gpu.run(parts, Path(args.out), args.deadline, extra)


if __name__ == "__main__":
    sys.exit(main())
