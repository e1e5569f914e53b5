"""The recall section of docs/benchmarks.md from its data (benchmarks/recall.py's runs)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from benchmarks.common import ROOT, further_runs, section_head, table

TITLE = "Recall: what a bounded prefill evicts waits in CPU memory for the question"
ONE_CHUNK = ROOT / "docs" / "data" / "quality-2k-30.kvscope.json"  # the one-chunk rows of the same cases


def _rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(ROOT))


def _rows(path: Path, key: str = "passkey") -> list[dict]:
    return json.loads(Path(path).read_text())[key] if Path(path).exists() else []


def scores(rows: list[dict]) -> dict:
    """(length, fraction, policy, mode) -> {case_id: found}."""
    out = defaultdict(dict)
    for r in rows:
        length = r.get("target_length") or _target(r["length"])
        out[(length, r["fraction"], r["policy"], r["mode"])][r["case_id"]] = r["found"]
    return out


def _target(length: int) -> int:
    return 1 << round(length).bit_length() if length & (length - 1) else length


def best_press(kvpress: list[dict], cases: set[str], length: int, fraction: float) -> tuple[str, int] | None:
    found = defaultdict(int)
    for r in kvpress:
        if r["tool"] == "kvpress" and r["fraction"] == fraction and r["case_id"] in cases and r.get(
                "target_length", length) == length and r["policy"] != "none":
            found[r["policy"]] += bool(r["found"])
    return max(found.items(), key=lambda kv: kv[1]) if found else None


def passkey_table(data: dict, kvpress: list[dict]) -> tuple[str, list[dict]]:
    mine = scores(data["passkey"])
    cases = {k[0]: set(v) for k, v in mine.items()}
    one = {k: v for k, v in scores(_rows(ONE_CHUNK)).items() if k[3] == "one-chunk"}
    one.update({k: v for k, v in mine.items() if k[3] == "one-chunk"})
    out = []
    for (length, f, policy, _) in sorted({k for k in mine if k[3] == "chunked"}):
        ids = cases[length]
        n = len(ids)

        def cell(m: dict, ids: set = ids) -> int:
            return sum(found for cid, found in m.items() if cid in ids)

        base = one.get((length, f, policy, "one-chunk"), {})
        press = best_press(kvpress, ids, length, f)
        out.append({"length": length, "budget": f"{f:.1%}", "policy": policy, "cases": n,
                    "one_chunk": f"{cell(base)}/{n}" if set(ids) <= set(base) else "not run",
                    "chunked": f"{cell(mine[(length, f, policy, 'chunked')])}/{n}",
                    "recall": f"{cell(mine[(length, f, policy, 'recall')])}/{n}",
                    "press": f"{press[0]} {press[1]}/{n}" if press else "not run",
                    "_recall": cell(mine[(length, f, policy, "recall")]),
                    "_one": cell(base) if set(ids) <= set(base) else None, "_press": press[1] if press else None})
    cols = [("length", "prompt"), ("budget", "budget"), ("policy", "policy"), ("one_chunk", "one chunk"),
            ("chunked", f"{data['chunk']}-token chunks"), ("recall", "chunks + recall cpu"),
            ("press", "best kvpress press")]
    return table(out, cols), out


def seconds_table(data: dict) -> str:
    by = defaultdict(list)
    for r in data["passkey"]:
        if r["mode"] != "one-chunk":
            by[(r["length"] // 1024 * 1024 or r["length"], r["policy"], r["mode"])].append(r["seconds"])
    rows = [{"length": n, "policy": p, "mode": m, "s": f"{sum(v) / len(v):.1f}"} for (n, p, m), v in sorted(by.items())]
    return table(rows, [("length", "prompt"), ("policy", "policy"), ("mode", "mode"),
                        ("s", "seconds per case (prefill + 10 tokens)")])


def ppl_rows(data: dict) -> list[dict]:
    """Per (policy, budget): each text's perplexity without -> with recall, and their mean."""
    by = defaultdict(dict)
    for r in data.get("perplexity", []):
        by[(r["policy"], r["fraction"])].setdefault(r.get("text", "story"), {})[r["recall"] or "none"] = r["ppl"]
    out = []
    for (policy, f), texts in by.items():
        pairs = {t: (v["none"], v["cpu"]) for t, v in texts.items() if {"none", "cpu"} <= set(v)}
        if not pairs:
            continue
        mean = tuple(sum(p[i] for p in pairs.values()) / len(pairs) for i in (0, 1))
        out.append({"policy": policy, "budget": f"{f:.1%}", "texts": pairs, "mean": mean,
                    "worse": sorted(t for t, (a, b) in pairs.items() if b > a)})
    return out


def _pct(a: float, b: float) -> str:
    return f"{100 * (b - a) / a:+.2f}%"


def _change(a: float, b: float) -> str:
    return f"{a:.3f} → {b:.3f} ({_pct(a, b)})"


def ppl_table(data: dict) -> str:
    rows = ppl_rows(data)
    names = list(dict.fromkeys(t for r in rows for t in r["texts"]))
    cells = [{"policy": r["policy"], "budget": r["budget"], **{t: _change(*r["texts"][t]) if t in r["texts"] else "-"
                                                                 for t in names}, "mean": _change(*r["mean"])}
             for r in rows]
    return table(cells, [("policy", "policy"), ("budget", "budget"), *[(t, t) for t in names], ("mean", "mean")])


def ppl_verdict(data: dict) -> str:
    parts = []
    for r in ppl_rows(data):
        worse = ", ".join(f"{t} ({_pct(*r['texts'][t])})" for t in r["worse"])
        mean = "no worse: met" if r["mean"][1] <= r["mean"][0] else "worse: MISSED"
        parts.append(f"{r['policy']} at {r['budget']}: mean {mean}; worse with recall on {worse or 'no text'}")
    return "; ".join(parts)


def memory_line(data: dict) -> str:
    """What each side holds on the device for a 2k prompt on this model (fp32 KV, the embedded model's shape)."""
    from kvscope.models import loader

    spec = loader.spec_for("smollm2-135m")
    per = spec.kv_bytes_per_token("fp32")
    chunk = data["chunk"]
    lines = []
    for n in sorted({_target(r["length"]) for r in data["passkey"]}):
        for f in sorted({r["fraction"] for r in data["passkey"]}):
            b = round(f * n)
            lines.append(f"{n} tokens at {f:.1%}: kvscope holds at most {b} + {chunk} tokens "
                         f"({(b + chunk) * per / 2**20:.1f} MiB) on the device where a kvpress press first holds the "
                         f"whole prompt ({n * per / 2**20:.1f} MiB, {n / (b + chunk):.1f}x)")
    return "; ".join(lines)


def verdict(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        within = r["_one"] is not None and r["_recall"] >= r["_one"] - 1
        above = "not run" if r["_press"] is None else "met" if r["_recall"] > r["_press"] else "not met"
        parts.append(f"{r['policy']} {r['length']} at {r['budget']}: recall {r['_recall']}/{r['cases']}, one chunk "
                     f"{r['one_chunk']} (within one case: {'met' if within else 'MISSED'}), best press "
                     f"{r['press']} (above it: {above})")
    return "; ".join(parts)


def _earlier_runs(meta: dict) -> str:
    """The runs whose rows a `--resume` run kept (their provenance, newest first)."""
    lines = []
    while meta.get("resumed"):
        meta = meta["resumed"]
        lines.append(f"- kept from an earlier run: commit {meta['commit']}, `{meta['command']}`")
    return "\n".join(lines) + "\n\n" if lines else ""


def render(data: dict, kvpress_paths: list[Path], data_path: str = "docs/data/recall.json",
           more: dict[str, dict] | None = None) -> str:
    """The section; `kvpress_paths`: the quality benchmark's runs whose kvpress rows are compared (by case id);
    `more`: further runs (`docs/data/recall.<tag>.json` by file name), each with its own table and verdict."""
    md = section_head(TITLE, data["meta"], data_path, f"python -m benchmarks.recall --render --out {data_path}",
                      "recall")
    kvpress = [r for path in kvpress_paths for r in _rows(path)]
    text, rows = passkey_table(data, kvpress)
    md += _earlier_runs(data["meta"])
    md += ("Passkey, question after the text, the embedded SmolLM2-135M on the CPU, fp32. One chunk: the policy sees "
           "the whole prompt before it evicts (at 2k, rows from `docs/data/quality-2k-30.kvscope.json`, the same "
           "cases; at 4k, this data's own). "
           f"Chunked: kvscope run's default bounded prefill of {data['chunk']} tokens, the device holding budget + one "
           "chunk. Recall: the same, with `recall=\"cpu\"`. kvpress: the best of its presses on the same token ids "
           f"({', '.join(f'`{_rel(p)}`' for p in kvpress_paths if Path(p).exists())}).\n\n")
    md += text + "\n\n"
    md += f"**Verdict.** {verdict(rows)}.\n\nDevice memory: {memory_line(data)}.\n\n"
    md += "Time per case on this CPU (2 shared cores, other work running):\n\n" + seconds_table(data) + "\n\n"
    if data.get("perplexity"):
        md += ("Streamed perplexity without → with recall (the second half of each text scored; the text fed in "
               f"{data['chunk']}-token chunks as one prompt, so with recall the last chunk recalls before it attends). "
               "Texts: the first 2048 tokens of the story, and the 2k passkey prompts of the first key at depths "
               "0.1, 0.5 and 0.9 (the same prose in other orders, with the key and the question):\n\n"
               + ppl_table(data) + f"\n\n**Perplexity verdict.** {ppl_verdict(data)}.\n")
    return md + further_runs(more or {}, lambda run: _further(run, kvpress))


def _further(run: dict, kvpress: list[dict]) -> str:
    text, rows = passkey_table(run, kvpress)
    return (_earlier_runs(run["meta"]) + text + f"\n\n**Verdict.** {verdict(rows)}.\n\n"
            f"Device memory: {memory_line(run)}.\n")
