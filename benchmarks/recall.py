"""The recall tier on the embedded SmolLM2-135M (CPU): passkey with the question after the text, under a bounded
(chunked) prefill with and without `recall="cpu"`, against the one-chunk prefill (the policy sees the whole prompt
before it evicts) and NVIDIA kvpress's presses (which compress after a whole-prompt prefill); streamed perplexity with
and without recall, on the story and on three of the 2k passkey prompts (other orders of the same prose, the key and
question inside), so that one text's noise is not read as the tier's effect.

    python -m benchmarks.recall                    # 2k: the 30-case set (10 depths x 3 keys); 4k: 10 cases
    python -m benchmarks.recall --keys 2048:1,4096:1 --lengths 2048 --no-one-chunk   # 10 cases, bounded rows only
    python -m benchmarks.recall --render           # rewrite the docs section from docs/data/recall.json
    python -m benchmarks.recall --budgets 0.025,0.05 --lengths 2048 --no-one-chunk --out docs/data/recall.low.json
                                                   # a further run (docs/data/recall.<tag>.json), below the main one

Cases and answers as in the quality benchmark (benchmarks/quality_cases.py): a 5-digit key hidden at a depth of real
prose, the question after it, greedy decoding of 10 tokens, a case passes when the exact key appears. The kvpress rows
are the quality benchmark's 30-case run at 2k (docs/data/quality-2k-30.base.json): the same token ids.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, run_meta, save_json, write_section
from benchmarks.quality_cases import passkey_cases, perplexity_ids
from benchmarks.quality_runners import budget_for, kvscope_passkey, log, ppl_stream, run_direct

DATA = ROOT / "docs" / "data" / "recall.json"
# kvpress's rows of the same cases: 2k (30 cases, 28 presses), 4k (10 cases, 28 presses)
KVPRESS = [ROOT / "docs" / "data" / "quality-2k-30.base.json", ROOT / "docs" / "data" / "recall.kvpress-4k.json",
           ROOT / "docs" / "data" / "quality-2k-30.low-kvpress.json"]  # 2.5% and 5%: the 7 best presses
DEPTHS = "0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95"
MODES = ("one-chunk", "chunked", "recall")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens")
    p.add_argument("--depths", default=DEPTHS, help="relative depths of the key")
    p.add_argument("--keys", default="2048:3,4096:1", help="keys per (length, depth): LENGTH:N,...")
    p.add_argument("--budgets", default="0.125,0.25", help="budget fractions of the prompt")
    p.add_argument("--policies", default="snapkv,lru")
    p.add_argument("--one-chunk", action=argparse.BooleanOptionalAction, default=True,
                   help="run the one-chunk rows too (--no-one-chunk: take them from the quality benchmark's data)")
    p.add_argument("--chunk", type=int, default=512, help="chunk of the bounded prefill (kvscope run's default)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="streamed perplexity text (0: none)")
    p.add_argument("--ppl-texts", default="story,haystacks",
                   help="perplexity texts: story (its first --ppl-tokens tokens), haystacks (the 2k passkey prompts "
                        "of the first key at depths 0.1, 0.5, 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--out", type=Path, default=DATA)
    p.add_argument("--resume", action="store_true", help="keep --out's rows and run only the rows it lacks")
    p.add_argument("--rerun", default="", help="with --resume: modes whose rows in --out are measured again, for "
                                               "this run's --policies, --budgets and cases only (e.g. recall, after "
                                               "a change to the tier); the perplexity rows of --policies are "
                                               "measured again too")
    p.add_argument("--render", action="store_true", help="only rewrite the docs section from --out")
    a = p.parse_args(argv)
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.depths = [float(x) for x in a.depths.split(",")]
    a.keys = {int(k): int(v) for k, v in (x.split(":") for x in a.keys.split(","))}
    a.budgets = [float(x) for x in a.budgets.split(",")]
    a.policies = a.policies.split(",")
    a.ppl_texts = a.ppl_texts.split(",")
    a.rerun = [m for m in a.rerun.split(",") if m]
    if unknown := set(a.rerun) - set(MODES):
        p.error(f"--rerun: unknown {', '.join(sorted(unknown))} (expected {', '.join(MODES)})")
    if a.rerun and not a.resume:
        p.error("--rerun needs --resume (it says which of --out's rows to measure again)")
    if unknown := set(a.ppl_texts) - {"story", "haystacks"}:
        p.error(f"--ppl-texts: unknown {', '.join(sorted(unknown))} (expected story, haystacks)")
    return a


def bounded_rows(model, tok, case, policy, fractions, chunk, max_new, done=frozenset()) -> list[dict]:
    """The chunked and recall rows of one case, but those in `done` ((case id, policy, fraction, mode))."""
    rows = []
    ids = torch.tensor([case.input_ids])
    for f in fractions:
        b = budget_for(f, case.length)
        for mode, recall in (("chunked", None), ("recall", "cpu")):
            if (case.case_id, policy, f, mode) in done:
                continue
            t = time.perf_counter()
            gen = run_direct(model, ids, policy, b, chunk, max_new, tok.eos_token_id, recall=recall)
            text = tok.decode(gen, skip_special_tokens=True)
            rows.append({"policy": policy, "mode": mode, "chunk": chunk, "fraction": f, "budget_tokens": b,
                         "case_id": case.case_id, "length": case.length, "depth": case.depth, "key": case.key,
                         "answer": text, "found": case.key in text, "seconds": round(time.perf_counter() - t, 2)})
            gc.collect()
    return rows


def one_chunk_rows(model, tok, case, policies, fractions, max_new) -> list[dict]:
    rows = kvscope_passkey(model, tok, [case], policies, fractions, max_new, direct=False)
    return [{"policy": r["policy"], "mode": "one-chunk", "chunk": r["chunk"], "fraction": r["fraction"],
             "budget_tokens": r["budget_tokens"], "case_id": r["case_id"], "length": r["length"], "depth": r["depth"],
             "key": r["key"], "answer": r["answer"], "found": r["found"], "seconds": r["seconds"]} for r in rows]


def perplexity_texts(tok, a) -> dict[str, list[int]]:
    texts = {"story": perplexity_ids(tok, a.ppl_tokens)} if "story" in a.ppl_texts else {}
    if "haystacks" in a.ppl_texts:
        texts.update({c.case_id: list(c.input_ids) for c in passkey_cases(tok, (2048,), (0.1, 0.5, 0.9), 1)})
    return texts


def perplexity(model, tok, a) -> list[dict]:
    rows = []
    for text, ids in perplexity_texts(tok, a).items():
        for policy in a.policies:
            for f in a.budgets:
                b = budget_for(f, len(ids))
                for recall in (None, "cpu"):
                    t = time.perf_counter()
                    r = ppl_stream(model, ids, policy, b, a.chunk, recall=recall)
                    ppl = round(float(torch.exp(torch.tensor(r["nll_sum"] / r["tokens"]))), 4)
                    rows.append({"text": text, "policy": policy, "fraction": f, "budget_tokens": b, "chunk": a.chunk,
                                 "recall": recall, "ppl": ppl, "tokens": r["tokens"],
                                 "seconds": round(time.perf_counter() - t, 1)})
                    log(f"perplexity {text} {policy} {f:.1%} recall={recall}: {ppl}")
    return rows


def recorded_args(a) -> dict:
    """The run's options as data; the output path is left out: it names this machine, not the run."""
    return {k: str(v) for k, v in vars(a).items() if k != "out"}


def run(a) -> dict:
    import kvscope

    torch.manual_seed(0)
    model, tok, spec = kvscope.load("smollm2-135m", device="cpu", dtype="fp32")
    data = {"meta": run_meta(), "args": recorded_args(a), "model": spec.name,
            "chunk": a.chunk, "passkey": [], "perplexity": []}
    cases = [c for n in a.lengths for c in passkey_cases(tok, (n,), a.depths, a.keys.get(n, 1))]
    done = set()
    if a.resume and a.out.exists():  # a longer run over a shorter one: its cases are the same token ids
        old = json.loads(a.out.read_text())
        data["passkey"] = kept_rows(old["passkey"], a, {c.case_id for c in cases})
        data["perplexity"] = old.get("perplexity", [])  # kept unless this run measures it again
        done = {(r["case_id"], r["policy"], r["fraction"], r["mode"]) for r in data["passkey"]}
        data["meta"]["resumed"] = old["meta"]
        if a.rerun:
            data["meta"]["rerun"] = a.rerun
    cases = [c for c in cases if not _complete(c, a, done)]
    for i, case in enumerate(cases):
        t = time.perf_counter()
        if a.one_chunk and not all((case.case_id, p, f, "one-chunk") in done for p in a.policies for f in a.budgets):
            data["passkey"] += one_chunk_rows(model, tok, case, a.policies, a.budgets, a.max_new_tokens)
        for policy in a.policies:
            data["passkey"] += bounded_rows(model, tok, case, policy, a.budgets, a.chunk, a.max_new_tokens, done)
        save_json(data, a.out)  # after every case: a long run that stops keeps what it measured
        log(f"case {i + 1}/{len(cases)} {case.case_id} in {time.perf_counter() - t:.0f} s")
    if a.ppl_tokens:  # the other policies' rows of a resumed run are kept
        data["perplexity"] = [r for r in data["perplexity"] if r["policy"] not in a.policies] + \
            perplexity(model, tok, a)
    save_json(data, a.out)
    return data


def kept_rows(rows: list[dict], a, cases: set[str]) -> list[dict]:
    """The rows of a resumed run's --out that this run keeps: all but those of a --rerun mode that it measures again
    (its --policies, --budgets and `cases`); a row dropped and not measured again would be lost."""
    return [r for r in rows if not (r["mode"] in a.rerun and r["policy"] in a.policies and r["fraction"] in a.budgets
                                    and r["case_id"] in cases)]


def _complete(case, a, done: set) -> bool:
    modes = ["chunked", "recall"] + (["one-chunk"] if a.one_chunk else [])
    return all((case.case_id, p, f, m) in done for p in a.policies for f in a.budgets for m in modes)


def main(argv=None) -> int:
    from benchmarks.recall_render import render

    args = parse_args(argv)
    if not args.render:
        run(args)
    main_data = DATA if args.out.resolve() in further_paths() else args.out  # a further run renders the whole section
    write_section("recall", render(json.loads(main_data.read_text()), KVPRESS, _relative(main_data), further()))
    return 0


def further_paths() -> list[Path]:
    return [p.resolve() for p in sorted(DATA.parent.glob("recall.*.json")) if p not in KVPRESS]


def further() -> dict[str, dict]:
    """The section's further runs: docs/data/recall.<tag>.json, but the kvpress rows it compares against."""
    return {p.name: json.loads(p.read_text()) for p in further_paths()}


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    raise SystemExit(main())
