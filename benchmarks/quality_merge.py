"""One passkey table from several runs of benchmarks/quality.py on the same cases (same lengths, depths, keys, seed).

    python -m benchmarks.quality_merge --section quality-2k-30 --length 2048 RUN.json [RUN.json ...]

Runs are read in order; a later run's rows replace an earlier run's rows for the same (tool, policy, mode, KV dtype,
budget, case), so a policy re-measured after a code change replaces its old rows and nothing else. Every run must
hold the same cases (checked by case id and key). Writes a table (one row per policy or press, one column per budget)
and the verdict at each budget to the docs section, from the data alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import header_facts, table, write_section

GroupKey = tuple  # (tool, policy, mode, kv_dtype)


def load_rows(paths: list[str], length: int) -> tuple[dict, dict[str, str], list[dict]]:
    """Rows of every run at `length`, later runs replacing earlier ones; the cases' keys; the runs' metadata."""
    rows: dict[tuple, dict] = {}
    keys: dict[str, str] = {}
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append({"path": path, "header": data.get("header", ""), "args": data.get("args", {}),
                     "timings": data.get("timings", {})})
        ids = {r["case_id"] for r in data["passkey"] if r["target_length"] == length}
        if keys and ids != set(keys):
            raise SystemExit(f"{path}: its cases at {length} tokens differ from the first run's ({len(ids)} vs "
                             f"{len(keys)} cases): merge only runs with the same --depths, --keys, --doors and --seed")
        for r in data["passkey"]:
            if r["target_length"] != length:
                continue
            known = keys.setdefault(r["case_id"], r["key"])
            if known != r["key"]:
                raise SystemExit(f"{path}: case {r['case_id']} has key {r['key']}, another run has {known}: "
                                 "the runs were made on different cases (check --seed, --doors, --depths)")
            rows[(r["tool"], r["policy"], r["mode"], r["kv_dtype"], r["fraction"], r["case_id"])] = r
    return rows, keys, runs


def scores(rows: dict) -> dict[GroupKey, dict[float, list[int]]]:
    """(tool, policy, mode, kv_dtype) -> budget -> [hits, cases]."""
    out: dict[GroupKey, dict[float, list[int]]] = {}
    for (tool, policy, mode, kv, fraction, _), r in rows.items():
        cell = out.setdefault((tool, policy, mode, kv), {}).setdefault(fraction, [0, 0])
        cell[0] += int(r["found"])
        cell[1] += 1
    return out


def name(group: GroupKey) -> str:
    tool, policy, mode, kv = group
    extra = [m for m in (mode if mode not in ("one-chunk", "together") else "", f"kv {kv}" if kv else "") if m]
    label = "no press" if tool == "kvpress" and policy == "none" else policy
    return f"{tool} {label}" + (f" ({', '.join(extra)})" if extra else "")


def compared(group: GroupKey) -> bool:
    """The rows the verdict compares: one-chunk kvscope policies and kvpress presses on the whole prompt, each with
    its tool's default knobs (a `name[knob=value]` ablation row is shown, not compared)."""
    tool, policy, mode, kv = group
    return not kv and policy not in ("full", "none") and "[" not in policy and mode in ("one-chunk", "together")


def verdicts(groups: dict, fractions: list[float]) -> list[str]:
    lines = []
    for f in fractions:
        best = {}
        for tool in ("kvscope", "kvpress"):
            cand = {g: c[f] for g, c in groups.items() if g[0] == tool and compared(g) and f in c}
            if cand:
                top = max(h / n for h, n in cand.values())
                names = sorted(g[1] for g, (h, n) in cand.items() if h / n == top)
                best[tool] = (top, names, next(c for c in cand.values() if c[0] / c[1] == top))
        if len(best) < 2:
            continue
        (a, an, ac), (b, bn, bc) = best["kvscope"], best["kvpress"]
        word = "beats" if a > b else "ties" if a == b else "loses to"
        lines.append(f"- {100 * f:g}%: kvscope {'/'.join(an)} {ac[0]}/{ac[1]} {word} the best kvpress press "
                     f"{'/'.join(bn)} {bc[0]}/{bc[1]}")
    return lines


def render(groups: dict, fractions: list[float], runs: list[dict], length: int, cases: int, title: str) -> str:
    cols = [("name", "tool / policy or press")] + [(f"f{f}", f"{100 * f:g}%") for f in fractions] + [("full", "full")]

    def sort_key(item):
        g, cells = item
        low = [cells[f][0] / cells[f][1] if f in cells else -1 for f in fractions]
        return (g[0] != "kvscope", g[1] != "full", [-x for x in low], name(g))
    body = []
    for g, cells in sorted(groups.items(), key=sort_key):
        row = {"name": name(g)}
        for f, (h, n) in cells.items():
            row["full" if f == 1.0 else f"f{f}"] = f"{h}/{n}"
        body.append(row)
    md = f"## {title}\n\n"
    md += ("Runs merged, in order (a later run's rows replace an earlier run's for the same policy, budget and "
           "case):\n\n")
    for run in runs:
        facts = header_facts(run["header"])
        md += (f"- `{Path(run['path']).name}`: {facts.get('date', '?')}, commit {facts.get('commit', '?')}, "
               f"{facts.get('device', '?')}; {facts.get('command', '?')}\n")
    md += (f"\n{cases} cases at {length} tokens, the same token ids in every run. Budget = the fraction of the prompt "
           "kept per layer and KV head (kvpress: `compression_ratio = 1 - fraction`); cells are cases passed / cases "
           "run. Written by `python -m benchmarks.quality_merge` from the runs' JSON.\n\n")
    md += (table(body, cols) + "\nBest of each tool per budget (default knobs; `[knob=value]` rows are ablations, "
           "not compared):\n\n" + "\n".join(verdicts(groups, fractions)) + "\n")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by benchmarks/quality.py (--json)")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--section", required=True, help="docs section to write")
    ap.add_argument("--title", default="Passkey under KV budgets: kvscope policies against kvpress presses")
    ap.add_argument("--intro-file", default=None, help="a markdown file whose text goes under the title")
    ap.add_argument("--docs", default=None, help="the benchmarks page (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    rows, keys, runs = load_rows(args.runs, args.length)
    if not rows:
        raise SystemExit(f"no passkey rows at {args.length} tokens in {', '.join(args.runs)}")
    groups = scores(rows)
    fractions = sorted({f for cells in groups.values() for f in cells if f != 1.0})
    md = render(groups, fractions, runs, args.length, len(keys), args.title)
    shown = ["python", "-m", "benchmarks.quality_merge"] + list(argv if argv is not None else sys.argv[1:])
    md = md.replace("Written by `python -m benchmarks.quality_merge` from the runs' JSON.",
                    "Written from the runs' JSON by `" + " ".join(f"'{a}'" if " " in a else a for a in shown) + "`.")
    if args.intro_file:
        md = md.replace("\n\n", f"\n\n{Path(args.intro_file).read_text().strip()}\n\n", 1)
    write_section(args.section, md, args.docs)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
