"""Quality benchmark on the embedded SmolLM2-135M (CPU): passkey retrieval and perplexity under every eviction policy
and budget, against NVIDIA kvpress presses on the same token ids.

    python -m benchmarks.quality                 # the full run, writes docs (40 min on 2 shared cores, 12 cases)
    python -m benchmarks.quality --quick         # about 3 minutes: 1k/2k, fewer policies, presses and cases
    python -m benchmarks.quality --render-from docs/data/quality.json   # rewrite the docs section from a run's JSON
    python -m benchmarks.quality --kv-dtypes bf16,fp8,int8,int4   # adds full-cache rows per KV storage format

What is measured (details in the "quality" section of docs/benchmarks.md, written by this script):
- passkey: a 5-digit key hidden at several depths of original prose (benchmarks/quality_cases.py), the question after
  it, chat template applied, answer begun with "The pass key is"; greedy decoding of up to 10 tokens; a case passes when
  the exact key appears in them. kvscope runs each prompt in one prefill chunk (chunk_size >= prompt), so the policy
  evicts after seeing the whole prompt, question included, as kvpress compresses after the prefill. The best policy is
  also run with chunk_size 512 (bounded-peak mode: storage stays at budget + 512 during prefill).
- perplexity, two measures on the first `--ppl-tokens` tokens of the prose; both score the same tokens (N/2+1 .. N-1):
  `stream` (kvscope only): the text is fed in chunks of `--ppl-chunk` tokens through a cache with a budget of the
  fraction x N tokens, evicting after every chunk, so the cache stays at the budget as the text advances;
  `prefix` (both tools): the first half is prefilled and compressed to the fraction x N/2 tokens, then the second half
  is scored teacher-forced in one forward on top of it (its own tokens not evicted), which is what a kvpress prefill
  press can do.

Prefill sharing (exact, checked): with one prefill chunk, a kvscope policy evicts after the chunk's attention, so the
prefill output and the policy's observations do not depend on the budget. Unless `--direct` is given, each policy that
reads attention (h2o, lru, snapkv, tova) prefills a case once with room for the whole sequence, and each budget is a
copy of that cache evicted down to the budget, then decoded; policies that read no attention (knorm, random,
sliding_window, streaming_llm: scores from keys and positions only) share the `full` policy's prefill, their scores set
by their own `on_insert` over every stored slot. A check on one 2k case compares this with plain
`kvscope.runtime.generate()` runs and records the result (`--direct` gave identical answers and perplexities to 1e-6 on
1k cases when this was written). kvpress's runner shares its prefill across presses in the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import ROOT, header, header_facts, save_json, write_section
from benchmarks.quality_cases import LABELS, passkey_cases, perplexity_ids
from benchmarks.quality_kvpress import PRESSES, run_kvpress
from benchmarks.quality_render import TITLE, kv_dtype_targets, plot, render, summarize, target_verdict
from benchmarks.quality_runners import (
    SKIPPED,
    bounded_passkey,
    fork_check,
    kv_dtype_passkey,
    kvscope_passkey,
    kvscope_ppl,
    log,
    make_policy,
    ppl_stream,
)

KV_DTYPES = ["bf16", "fp8", "int8", "int4"]
DEFAULT_KEYS = "1024:1,2048:2,4096:1"


def parse_keys(text: str, lengths: list[int]) -> dict[int, int]:
    if ":" not in text:
        return {n: int(text) for n in lengths}
    table_ = {int(k): int(v) for k, v in (p.split(":") for p in text.split(","))}
    return {n: table_.get(n, 1) for n in lengths}


# --- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: 1k/2k, 25%% budget, a few policies/presses")
    p.add_argument("--lengths", default="1024,2048,4096", help="passkey prompt lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="relative depths of the key")
    p.add_argument("--keys", default=DEFAULT_KEYS, help="keys per (length, depth): N, or LENGTH:N,... "
                   f"(default {DEFAULT_KEYS})")
    p.add_argument("--doors", type=int, default=1,
                   help="1: one pass key (default); N >= 2: multi-key, N doors with their own keys, one asked for")
    p.add_argument("--budgets", default="0.125,0.25,0.5", help="budget fractions of the prompt")
    p.add_argument("--policies", default="all", help="kvscope policies (comma list) or 'all'")
    p.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses (class names)")
    p.add_argument("--kvpress-modes", default="together,pipeline", help="together and/or pipeline")
    p.add_argument("--pipeline-lengths", default="2048", help="lengths at which pipeline mode runs ('' for none)")
    p.add_argument("--no-kvpress", action="store_true", help="kvscope only")
    p.add_argument("--kvpress-python", default=None, help="python of kvpress's venv (default .venv-kvpress)")
    p.add_argument("--setup-kvpress", action="store_true", help="create .venv-kvpress if missing")
    p.add_argument("--bounded-chunk", type=int, default=512, help="chunk size of the bounded-peak rows (0: none)")
    p.add_argument("--bounded-policy", default="best", help="policy for the bounded rows ('best' at 25%%, 2k)")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--ppl-chunk", type=int, default=64)
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--kv-dtypes", default="", help=f"add full-cache rows per KV format, e.g. {','.join(KV_DTYPES)}")
    p.add_argument("--kv-dtype-lengths", default="", help="passkey lengths for the --kv-dtypes rows (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="case seed (keys and story offsets)")
    p.add_argument("--direct", action="store_true", help="no prefill sharing: one generate() per policy and budget")
    p.add_argument("--no-verify", action="store_true", help="skip the shared-prefill checks")
    p.add_argument("--json", default=str(ROOT / "docs" / "data" / "quality.json"))
    p.add_argument("--plot", default=None, help="the plot's SVG (default: quality.svg beside the docs page)")
    p.add_argument("--docs", default=None, help="the benchmarks page (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/ (JSON still written to --json)")
    p.add_argument("--render-from", default=None, metavar="JSON",
                   help="only rewrite the docs section and plot from a finished run's JSON")
    p.add_argument("--replace-with", default=None, metavar="JSON",
                   help="with --render-from: a later run on the same cases whose policies' rows replace the first "
                        "run's rows of the same policies (e.g. policies re-measured after a code change)")
    args = p.parse_args(argv)
    if not 1 <= args.doors <= len(LABELS):
        p.error(f"--doors must be 1 (one pass key) to {len(LABELS)} (one per door label), got {args.doors}")
    if args.quick:
        args.lengths, args.keys, args.depths = "1024,2048", "1", "0.1,0.5"
        args.budgets = "0.25"
        args.policies = "full,snapkv,tova,streaming_llm" if args.policies == "all" else args.policies
        args.presses = "SnapKVPress,TOVAPress,KnormPress" if args.presses == ",".join(PRESSES) else args.presses
        args.kvpress_modes, args.ppl_tokens = "together", 1024
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.depths = [float(x) for x in args.depths.split(",") if x]
    args.budgets = sorted(float(x) for x in args.budgets.split(",") if x)
    args.presses = [x for x in args.presses.split(",") if x]
    args.kvpress_modes = [x for x in args.kvpress_modes.split(",") if x]
    args.pipeline_lengths = [int(x) for x in args.pipeline_lengths.split(",") if x]
    args.kv_dtypes = [x for x in args.kv_dtypes.split(",") if x]
    args.kv_dtype_lengths = [int(x) for x in args.kv_dtype_lengths.split(",") if x] or args.lengths
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_from:
        return render_from(args.render_from, args)
    torch.set_num_threads(args.threads)
    from kvscope import _compat
    from kvscope.models import load

    _compat.quiet_transformers()
    run = Run(args, header(TITLE))  # the commit the run starts from: the code it loads (HEAD may move meanwhile)
    if not run.check_policies():
        return 2
    model, tok, _ = load("smollm2-135m", dtype="fp32", device="cpu")
    run.cases_for(tok)
    log(f"{len(run.cases)} passkey cases, {len(run.policies)} kvscope policies, {len(args.presses)} presses, budgets "
        f"{args.budgets}")
    run.kvscope(model, tok)
    if not args.no_kvpress:
        run.kvpress(tok)
    run.finish()
    return 0


class Run:
    """One run of the benchmark: its stages add rows, timings, checks and notes; each stage checkpoints."""

    def __init__(self, args, head: str):
        from kvscope import policies

        self.args, self.head, self.started = args, head, time.perf_counter()
        pol = policies.available() if args.policies == "all" else args.policies.split(",")
        self.policies = ["full"] + [p for p in pol if p != "full"]
        self.passkey, self.ppl, self.checks, self.notes = [], [], [], []
        self.meta, self.timings, self.fork, self.kvpress_result = {}, {}, [], None
        self.cases, self.ppl_ids = [], None

    def check_policies(self) -> bool:
        """A misspelt policy or knob stops the run before anything runs, with the library's message."""
        from kvscope.errors import UsageError

        for spec in self.policies:
            try:
                make_policy(spec)
            except UsageError as exc:
                print(f"quality.py: error: --policies: {exc}", file=sys.stderr)
                return False
        return True

    def cases_for(self, tok) -> None:
        a = self.args
        keys = parse_keys(a.keys, a.lengths)
        self.cases = [c for n in a.lengths for c in passkey_cases(tok, [n], a.depths, keys[n], seed=a.seed,
                                                                     doors=a.doors)]
        self.ppl_ids = None if a.no_ppl else perplexity_ids(tok, a.ppl_tokens)

    def timed(self, name: str, fn, *fn_args):
        t = time.perf_counter()
        out = fn(*fn_args)
        self.timings[name] = round(time.perf_counter() - t, 1)
        checkpoint(self.args, self.passkey, self.ppl, self.timings)
        return out

    def kvscope(self, model, tok) -> None:
        a = self.args
        self.passkey += self.timed("kvscope_passkey_s", kvscope_passkey, model, tok, self.cases, self.policies,
                                   a.budgets, a.max_new_tokens, a.direct)
        self.fork_check(model, tok)
        if a.bounded_chunk and 2048 in a.lengths and len(self.policies) > 1:
            name = self.bounded_policy()
            cases = [c for c in self.cases if c.target_length == 2048]
            self.passkey += self.timed("kvscope_bounded_s", bounded_passkey, model, tok, cases, name, a.budgets,
                                       a.bounded_chunk, a.max_new_tokens)
            log(f"bounded-peak rows ({name}, chunk {a.bounded_chunk}) in {self.timings['kvscope_bounded_s']} s")
        for kv in a.kv_dtypes:
            self.kv_dtype_rows(model, tok, kv)
        if self.ppl_ids:
            self.ppl += self.timed("kvscope_ppl_s", kvscope_ppl, model, self.ppl_ids, self.policies, a.budgets,
                                   a.ppl_chunk, a.direct)

    def fork_check(self, model, tok) -> None:
        a = self.args
        case = next((c for c in self.cases if c.target_length == 2048), None)
        if a.direct or a.no_verify or not case or 0.25 not in a.budgets:
            return
        self.fork = fork_check(model, tok, case, self.passkey, 0.25, a.max_new_tokens)
        agree = sum(r["agrees"] for r in self.fork)
        self.checks.append(f"kvscope prefill sharing vs direct generate() on {case.case_id} at 25%: {agree}/"
                           f"{len(self.fork)} answers identical ({', '.join(r['policy'] for r in self.fork)})")

    def bounded_policy(self) -> str:
        if self.args.bounded_policy != "best":
            return self.args.bounded_policy
        groups = summarize(self.passkey, [], self.args.lengths)
        cand = [g for g in groups if g["tool"] == "kvscope" and g["policy"] != "full" and g["fraction"] == 0.25
                and "acc_2048" in g] or [g for g in groups if g["tool"] == "kvscope" and g["policy"] != "full"]
        return max(cand, key=lambda g: (g.get("acc_2048", 0), g["acc_all"] or 0))["policy"]

    def kv_dtype_rows(self, model, tok, kv: str) -> None:
        a = self.args
        t = time.perf_counter()
        rows, note = kv_dtype_passkey(model, tok, [c for c in self.cases if c.target_length in a.kv_dtype_lengths],
                                      kv, a.max_new_tokens)
        if note:
            self.notes.append(f"kv_dtype {kv} {note}")
            log(f"kv_dtype {kv}: {note}")
            return
        self.passkey += rows
        if self.ppl_ids:
            budget = len(self.ppl_ids) + a.ppl_chunk
            r = ppl_stream(model, self.ppl_ids, "full", budget, a.ppl_chunk, kv_dtype=kv)
            self.ppl.append({"tool": "kvscope", "policy": "full", "measure": "stream", "fraction": 1.0,
                             "kv_dtype": kv, "budget_tokens": budget, "chunk": a.ppl_chunk} | r)
        self.timings[f"kv_{kv}_s"] = round(time.perf_counter() - t, 1)
        checkpoint(a, self.passkey, self.ppl, self.timings)

    def kvpress(self, tok) -> None:
        from kvscope.models.embedded import ensure_converted

        log("kvpress runner starting")
        t = time.perf_counter()
        result = self.kvpress_result = run_kvpress(self.args, tok, self.cases, self.ppl_ids, self.args.budgets,
                                                   ensure_converted())
        self.passkey += result["passkey_rows"]
        self.ppl += result["ppl_rows"]
        self.meta["kvpress_versions"] = result["versions"]
        self.meta["kvpress_attn"] = result["attn_implementation"]
        self.timings["kvpress_s"] = round(time.perf_counter() - t, 1)
        ver = result.get("verify", [])
        if ver:
            vcase = next((c for c in self.cases if c.target_length == 2048), self.cases[0])
            self.checks.append(f"kvpress shared prefill vs kvpress's own hooks/pipeline on {vcase.case_id} at 25% "
                               f"({', '.join(sorted({v['press'] for v in ver}))}): "
                               f"{sum(bool(v['agrees']) for v in ver)}/{len(ver)} answers identical")

    def finish(self) -> None:
        a = self.args
        self.notes.extend(sorted(SKIPPED))
        self.meta["seconds"] = time.perf_counter() - self.started
        groups = summarize(self.passkey, self.ppl, a.lengths)
        verdict = target_verdict(groups)
        self.notes.extend(kv_dtype_targets(groups))
        result = {"args": dict(vars(a)), "timings": self.timings, "verdict": verdict, "checks": self.checks,
                  "notes": self.notes, "fork_check": self.fork, "meta": self.meta,
                  "cases": [c.to_json() | {"input_ids": None} for c in self.cases], "summary": groups,
                  "passkey": self.passkey, "ppl": self.ppl,
                  "kvpress_verify": self.kvpress_result.get("verify") if self.kvpress_result else None,
                  "header": self.head}
        save_json(result, a.json)
        log(f"done in {self.meta['seconds'] / 60:.1f} min; JSON in {a.json}")
        per_len = {n: sum(1 for c in self.cases if c.target_length == n) for n in a.lengths}
        publish(a, self.meta, groups, verdict, self.checks, self.notes, per_len, self.head, [shown(a.json)])


def publish(args, meta, groups, verdict, checks, notes, per_len, head, sources: list[str]) -> None:
    """The section and its plot. `sources`: the run's JSON (and a later run's), as the rebuild command names them."""
    rebuild = f"python -m benchmarks.quality --render-from {sources[0]}" + (
        f" --replace-with {sources[1]}" if len(sources) > 1 else "")
    md = render(args, meta, groups, verdict, checks, notes, per_len, head, sources[0], rebuild)
    print(md)
    if not args.no_docs:
        docs = Path(args.docs or common.DOCS)
        plot_path = Path(args.plot) if args.plot else docs.parent / "quality.svg"
        plot_path.write_text(plot(groups, args.budgets, 2048 if 2048 in args.lengths else args.lengths[0]) + "\n")
        write_section("quality", md, docs)


def shown(path: str) -> str:
    """A path as a section names it: relative to the repository when it is inside."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def render_from(path: str, args) -> int:
    """Rewrite the docs section and plot from a finished run's JSON (its own header: device, date, commit, command)."""
    data = _finished(path)
    saved = argparse.Namespace(**data["args"])
    saved.no_docs, saved.docs, saved.plot = args.no_docs, args.docs, args.plot
    if args.replace_with:
        data = replaced(data, _finished(args.replace_with), saved.lengths)
    groups = []
    for g in data["summary"]:
        g["hits"] = {int(k): v for k, v in g["hits"].items()}
        g["n"] = {int(k): v for k, v in g["n"].items()}
        groups.append(g)
    per_len = {n: sum(1 for c in data["cases"] if c["target_length"] == n) for n in saved.lengths}
    sources = [shown(path)] + ([shown(args.replace_with)] if args.replace_with else [])
    publish(saved, data["meta"], groups, data["verdict"], data["checks"], data["notes"], per_len, data["header"],
            sources)
    return 0


def _finished(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("partial") or "header" not in data:
        raise SystemExit(f"{path} holds no finished run (no summary or header); run the benchmark first")
    return data


def replaced(data: dict, later: dict, lengths: list[int]) -> dict:
    """`data` with the rows of every (tool, policy, KV dtype) that `later` ran replaced by `later`'s; summary and
    verdict recomputed; the header says what came from where. Both runs must hold the same cases."""
    ids = lambda d: {(c["case_id"], c["key"]) for c in d["cases"]}  # noqa: E731
    if ids(data) != ids(later):
        raise SystemExit("--replace-with: the runs hold different cases (check --lengths, --depths, --keys, --seed)")
    which = lambda r: (r["tool"], r["policy"], r.get("kv_dtype"))  # noqa: E731 - a KV-dtype row is its own row
    policies = {which(r) for r in later["passkey"] + later["ppl"]}
    keep = lambda rows: [r for r in rows if which(r) not in policies]  # noqa: E731
    out = dict(data, passkey=keep(data["passkey"]) + later["passkey"], ppl=keep(data["ppl"]) + later["ppl"])
    groups = summarize(out["passkey"], out["ppl"], lengths)
    out["summary"], out["verdict"] = groups, target_verdict(groups)
    facts = header_facts(later["header"])
    names = ", ".join(sorted({p for _, p, _ in policies}))
    out["header"] = data["header"].rstrip() + (
        f"\n- rows of {names} replaced by a later run: {facts.get('date')}, commit {facts.get('commit')}, "
        f"{facts.get('command')}\n\n")
    out["checks"] = data["checks"] + [f"(later run) {c}" for c in later.get("checks", [])]
    return out


def checkpoint(args, passkey, ppl, timings) -> None:
    """Partial results after each stage (a long run that dies keeps what it measured); replaced at the end."""
    save_json({"partial": True, "timings": timings, "passkey": passkey, "ppl": ppl}, args.json)
    import resource

    log(f"checkpoint: {len(passkey)} passkey rows, {len(ppl)} perplexity rows; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    sys.exit(main())
