"""The quality benchmark's tables, verdicts and plot: from passkey and perplexity rows to the docs section."""

from __future__ import annotations

import math

from benchmarks.common import table
from benchmarks.quality_kvpress import PRESSES


# --- aggregation and report ------------------------------------------------------------------------------------------
def ppl_value(r: dict) -> float:
    return math.exp(r["nll_sum"] / max(1, r["tokens"]))


def summarize(passkey: list[dict], ppl: list[dict], lengths: list[int]) -> list[dict]:
    """One row per (tool, policy, mode, kv_dtype, fraction): accuracy per length, overall, perplexities."""
    groups: dict[tuple, dict] = {}
    for r in passkey:
        key = (r["tool"], r["policy"], r["mode"], r["kv_dtype"], r["fraction"])
        g = groups.setdefault(key, {"tool": r["tool"], "policy": r["policy"], "mode": r["mode"],
                                    "kv_dtype": r["kv_dtype"], "fraction": r["fraction"], "hits": {}, "n": {}})
        g["hits"][r["target_length"]] = g["hits"].get(r["target_length"], 0) + int(r["found"])
        g["n"][r["target_length"]] = g["n"].get(r["target_length"], 0) + 1
    for r in ppl:
        mode = "one-chunk" if r["tool"] == "kvscope" else "together"
        key = (r["tool"], r["policy"], mode, r.get("kv_dtype"), r["fraction"])
        g = groups.setdefault(key, {"tool": r["tool"], "policy": r["policy"], "mode": mode,
                                    "kv_dtype": r.get("kv_dtype"), "fraction": r["fraction"], "hits": {}, "n": {}})
        g[f"ppl_{r['measure']}"] = round(ppl_value(r), 3)
    out = []
    for g in groups.values():
        for n in lengths:
            if n in g["n"]:
                g[f"acc_{n}"] = g["hits"][n] / g["n"][n]
        total = sum(g["n"].values())
        g["acc_all"] = sum(g["hits"].values()) / total if total else None
        out.append(g)
    return out


def fmt_acc(g: dict, n: int) -> str:
    if n not in g["n"]:
        return ""
    return f"{g['hits'][n]}/{g['n'][n]}"


def label(g: dict) -> str:
    if g["tool"] == "kvscope":
        if g["kv_dtype"]:
            return f"kvscope full, kv {g['kv_dtype']}"
        return f"kvscope {g['policy']}" + (f" ({g['mode']})" if g["mode"] != "one-chunk" else "")
    if g["policy"] == "none":
        return "kvpress no press" + (" (pipeline)" if g["mode"] == "pipeline" else "")
    return f"kvpress {g['policy']}" + (" (pipeline)" if g["mode"] == "pipeline" else "")


def order_key(g: dict):
    tool = 0 if g["tool"] == "kvscope" else 1
    mode = {"one-chunk": 0, "together": 0, "pipeline": 2}.get(g["mode"], 1)
    return (tool, mode, -(g["acc_all"] or 0), g["policy"])


def budget_tables(groups: list[dict], lengths: list[int], fractions: list[float]) -> str:
    cols = [("label", "tool / policy")] + [(f"a{n}", f"passkey {n // 1024}k") for n in lengths] + [
        ("all", "passkey all"), ("ps", "ppl stream"), ("pp", "ppl prefix")]

    def row(g):
        r = {"label": label(g), "all": f"{100 * g['acc_all']:.0f}%" if g["acc_all"] is not None else "",
             "ps": g.get("ppl_stream", ""), "pp": g.get("ppl_prefix", "")}
        r.update({f"a{n}": fmt_acc(g, n) for n in lengths})
        return r

    full = sorted([g for g in groups if g["fraction"] == 1.0], key=order_key)
    md = "#### Full cache (no eviction)\n\n" + table([row(g) for g in full], cols) + "\n"
    for f in fractions:
        rows = sorted([g for g in groups if g["fraction"] == f], key=order_key)
        md += f"#### Budget {100 * f:g}% of the prompt\n\n" + table([row(g) for g in rows], cols) + "\n"
    return md


def best_per_budget(groups: list[dict], lengths: list[int], fractions: list[float]) -> str:
    """One line per length: the best one-chunk kvscope policy and the best kvpress press (together) at each budget."""
    lines = []
    for n in lengths:
        key, cells = f"acc_{n}", []
        for f in fractions:
            best = {}
            for tool, modes in (("kvscope", ("one-chunk",)), ("kvpress", ("together",))):
                cand = [g for g in groups if g["tool"] == tool and g["mode"] in modes and g["fraction"] == f
                        and not g["kv_dtype"] and key in g]
                if cand:
                    top = max(cand, key=lambda g: g[key])
                    names = sorted(g["policy"] for g in cand if g[key] == top[key])
                    best[tool] = f"{'/'.join(names)} {fmt_acc(top, n)}"
            if best:
                cells.append(f"{100 * f:g}%: kvscope {best.get('kvscope', '-')} vs kvpress {best.get('kvpress', '-')}")
        if cells:
            lines.append(f"- {n // 1024}k: " + "; ".join(cells))
    return ("Best of each tool per budget (one-chunk kvscope policies vs kvpress presses on the whole prompt):\n\n"
            + "\n".join(lines) + "\n\n") if lines else ""


def target_verdict(groups: list[dict], fraction=0.25, length=2048) -> dict:
    key = f"acc_{length}"
    full = next((g for g in groups if g["tool"] == "kvscope" and g["policy"] == "full" and not g["kv_dtype"]
                 and key in g), None)
    mine = [g for g in groups if g["tool"] == "kvscope" and g["mode"] == "one-chunk" and g["fraction"] == fraction
            and not g["kv_dtype"] and key in g]
    presses = [g for g in groups if g["tool"] == "kvpress" and g["policy"] != "none" and g["fraction"] == fraction
               and key in g]
    if not full or not mine:
        return {"evaluated": False}
    best = max(mine, key=lambda g: (g[key], g["acc_all"] or 0))
    together = [g for g in presses if g["mode"] == "together"]
    pipeline = [g for g in presses if g["mode"] == "pipeline"]
    best_press = max(together, key=lambda g: g[key]) if together else None
    out = {"evaluated": True, "fraction": fraction, "length": length, "full_accuracy": full[key],
           "best_policy": best["policy"], "best_accuracy": best[key],
           "keeps_90pct_of_full": best[key] >= 0.9 * full[key],
           "best_press": best_press["policy"] if best_press else None,
           "best_press_accuracy": best_press[key] if best_press else None,
           "beats_every_press": all(best[key] > g[key] for g in together) if together else None,
           "ties_or_beats_every_press": all(best[key] >= g[key] for g in together) if together else None,
           "presses_matched": sorted(g["policy"] for g in together if g[key] >= best[key]),
           "beats_every_pipeline_press": all(best[key] > g[key] for g in pipeline) if pipeline else None,
           "cases": best["n"].get(length, 0)}
    return out


def kv_dtype_targets(groups: list[dict]) -> list[str]:
    base = next((g for g in groups if g["tool"] == "kvscope" and g["policy"] == "full" and not g["kv_dtype"]
                 and "ppl_stream" in g), None)
    out = []
    for g in groups:
        if g["kv_dtype"] and "ppl_stream" in g and base:
            rel = g["ppl_stream"] / base["ppl_stream"] - 1
            limit = {"int8": 0.01, "int4": 0.05}.get(g["kv_dtype"])
            met = "met" if limit is not None and rel <= limit else "missed"
            verdict = "" if limit is None else f" (target +<={100 * limit:g}%: {met})"
            out.append(f"kv {g['kv_dtype']} stream perplexity {g['ppl_stream']:.3f} vs fp32 "
                       f"{base['ppl_stream']:.3f}: {100 * rel:+.2f}%{verdict}")
    return out


# --- plot ------------------------------------------------------------------------------------------------------------
# one colour per algorithm, shared by the two tools (kvscope solid with dots, kvpress dashed with squares)
FAMILY_COLOR = {"snapkv": 0, "SnapKVPress": 0, "tova": 1, "TOVAPress": 1, "streaming_llm": 2, "StreamingLLMPress": 2,
                "knorm": 3, "KnormPress": 3, "h2o": 4, "ObservedAttentionPress": 4, "lru": 5, "sliding_window": 6,
                "random": 7, "RandomPress": 7, "ExpectedAttentionPress": 9}
PLOT_PRESSES = 8  # kvpress lines in the plot: the presses with the best mean passkey accuracy over the budgets


def plot_series(groups: list[dict], fractions: list[float], length: int) -> tuple[dict[str, dict], int]:
    """name -> {tool, policy, acc: {fraction: accuracy}, ppl: {fraction: prefix perplexity}} of the lines to draw,
    each ending at its own tool's full cache; and how many presses there were."""
    key = f"acc_{length}"
    series: dict[str, dict] = {}
    for g in groups:
        if g["kv_dtype"] or g["mode"] not in ("one-chunk", "together"):
            continue
        s = series.setdefault(label(g), {"tool": g["tool"], "policy": g["policy"], "acc": {}, "ppl": {}})
        if key in g:
            s["acc"][g["fraction"]] = g[key]
        if "ppl_prefix" in g:
            s["ppl"][g["fraction"]] = g["ppl_prefix"]
    full = {t: next((g for g in groups if g["tool"] == t and g["fraction"] == 1.0 and g["mode"] in
                     ("one-chunk", "together") and not g["kv_dtype"]), None) for t in ("kvscope", "kvpress")}
    names = [n for n in series if not n.endswith(" full") and "no press" not in n]
    presses = [n for n in names if series[n]["tool"] == "kvpress"]
    if len(presses) > PLOT_PRESSES:  # the strongest presses only: dozens of lines would hide each other
        mean = {n: sum(series[n]["acc"].get(f) or 0 for f in fractions) / len(fractions) for n in presses}
        shown = set(sorted(presses, key=lambda n: (-mean[n], n))[:PLOT_PRESSES])
        names = [n for n in names if series[n]["tool"] != "kvpress" or n in shown]
    out = {n: series[n] for n in names}
    for s in out.values():
        f = full[s["tool"]]
        if f:
            s["acc"].setdefault(1.0, f.get(key))
            s["ppl"].setdefault(1.0, f.get("ppl_prefix"))
    return out, len(presses)


def plot(groups: list[dict], fractions: list[float], length: int) -> str:
    """Two panels, passkey accuracy at `length` and prefix perplexity against the budget fraction: one line per
    policy or press (kvscope.report.charts, static SVG)."""
    from matplotlib.ticker import FuncFormatter

    from kvscope.report import charts

    series, presses = plot_series(groups, fractions, length)
    xs = sorted(fractions) + [1.0]
    fig, (acc, ppl) = charts.figure(12.5, 3.6, panels=2)
    extra = iter(charts.PALETTE[10:] * 4)
    for j, (name, s) in enumerate(series.items()):
        color = charts.PALETTE[FAMILY_COLOR[s["policy"]]] if s["policy"] in FAMILY_COLOR else next(extra)
        style = {"color": color, "lw": 1.8, "label": name, "ls": "--" if s["tool"] == "kvpress" else "-",
                 "marker": "s" if s["tool"] == "kvpress" else "o", "ms": 4}
        shift = (j - len(series) / 2) * 0.004  # identical values stay visible side by side
        for ax, field in ((acc, "acc"), (ppl, "ppl")):
            pts = [(i + shift, s[field][x]) for i, x in enumerate(xs) if s[field].get(x) is not None]
            if len(pts) >= 2:
                ax.plot(*zip(*pts), **style)
    for ax, title in ((acc, f"passkey accuracy at {length // 1024}k tokens"),
                      (ppl, "perplexity, prefix measure (log scale, lower is better)")):
        ax.set_xticks(range(len(xs)), [f"{100 * x:g}%" for x in xs])
        ax.set_xlabel("KV budget (fraction of the prompt)")
        ax.set_title(title, fontsize=11)
    acc.set_ylim(-0.02, 1.02)
    ppl.set_yscale("log")
    for axis in (ppl.yaxis.set_major_formatter, ppl.yaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _: f"{v:.3g}"))
    note = f"kvpress: top {PLOT_PRESSES} of {presses} presses by mean accuracy" if presses > PLOT_PRESSES else None
    fig.legend(*acc.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False, title=note,
               title_fontsize=8)
    return charts.svg(fig, "quality", f"Passkey accuracy and perplexity against the KV budget ({length} tokens)")


TITLE = "Quality: passkey retrieval and perplexity under KV budgets (embedded SmolLM2-135M, CPU)"


def presses_ran(presses: list[str]) -> str:
    if sorted(presses) == sorted(PRESSES):
        return f"the default list, {len(PRESSES)} presses and wrappers"
    return f"{len(presses)} ({', '.join(presses)}), not the default list of {len(PRESSES)}"


def render(args, meta: dict, groups, verdict, checks, notes, per_len: dict, head: str, data: str, rebuild: str) -> str:
    fractions, lengths = args.budgets, args.lengths
    md = head
    md += (
        f"Model: embedded SmolLM2-135M-Instruct, fp32 on CPU, sdpa (kvscope runs its own attention inside "
        f"`BudgetedCache`; kvpress {meta.get('kvpress_versions', {}).get('kvpress', '-')} with transformers "
        f"{meta.get('kvpress_versions', {}).get('transformers', '-')} in `.venv-kvpress`, "
        f"`attn_implementation={meta.get('kvpress_attn', '-')}`). Run time: {meta['seconds'] / 60:.1f} min on a CPU "
        "shared with other jobs (stage times in the JSON).\n\n"
        "**Passkey.** A 5-digit key (`The pass key is K. Remember it. K is the pass key.`) hidden at relative "
        f"depths {', '.join(f'{100 * d:g}%' for d in args.depths)} of original prose "
        "(benchmarks/quality_cases.py), the question after the story, chat template applied, the assistant's answer "
        "begun with `The pass key is`. Prompts are within 3% of "
        f"{', '.join(str(n) for n in lengths)} tokens (template included); cases per length: "
        f"{', '.join(f'{n}: {k}' for n, k in per_len.items())} (depths x keys). Greedy decoding of up to "
        f"{args.max_new_tokens} tokens; a case passes when the exact key is among them. Both tools get the same token "
        "ids. The budget is the fraction of the prompt's tokens kept per layer and KV head (kvpress: "
        "`compression_ratio = 1 - fraction`).\n"
        "- kvscope (`one-chunk`): `BudgetedCache(model, policy, budget_tokens=fraction x prompt, "
        "chunk_size=prompt)` and `generate(..., chunk_size=prompt)`: the policy evicts after the whole prompt's "
        "prefill, question included, like a kvpress press. `chunk 512` rows: the bounded-peak mode (prefill in "
        "chunks of 512, eviction after each, storage budget + 512), for the best one-chunk policy at 2k.\n"
        "- kvpress (`together`, the main comparison): `with press(model): model(prompt)` on the whole prompt "
        "(context + question + answer prefix), then greedy decoding. `(pipeline)` rows: what the "
        "`kv-press-text-generation` pipeline does (context compressed, question and answer prefix added "
        "uncompressed on top, so the press cannot see the question but the question's tokens are kept beyond the "
        f"budget); run at {', '.join(str(n) for n in args.pipeline_lengths) or 'no'} tokens.\n"
        "- Knobs are each tool's defaults (kvscope: snapkv window 32 / kernel 7, average pool; lru threshold 0.01 / "
        "top_k 8 / spread 7, the last use max-pooled over 7 neighbouring positions; knorm and random keep the 8 "
        "newest tokens; h2o recent_ratio 0.5; kvpress: SnapKVPress window 64 / kernel 5; streaming: 4 sinks in both; "
        "random: seed 0).\n"
        f"- Presses: {presses_ran(args.presses)}. The default list is every kvpress press that prunes the "
        "prompt's KV to a compression ratio on sdpa without downloading anything (the scorer presses, KVzip, "
        "KVgrad), and kvpress's wrappers around a scorer (`Wrapper(Inner)`, default knobs, around SnapKV, TOVA or "
        "ExpectedAttention; BlockPress around "
        "KeyDiff, as in the KeyDiff paper). Head-wise presses (AdaKV, CriticalAdaKV, KVzip, KVgrad) keep every key "
        "and mask the dropped ones in attention, kvpress's own mechanism; their budget is the mean kept per layer and "
        "KV head (KVzip and KVgrad spread it unevenly over layers). KVzip and KVgrad run through their own "
        "`__call__` (prefill, then context reconstruction passes; KVgrad adds a backward pass), one reconstruction "
        "per case serving every budget (checked for KVzip against the plain press below). Left out: "
        "ObservedAttentionPress and KVComposePress (eager attention; `--presses` adds ObservedAttention, and every "
        "kvpress prefill then runs eager), QFilter, KVzap, FastKVzip, DuoAttention, LUKV, "
        "RestoreKV, ExpectedAttentionStats (they download learned filters, models, patterns, curves or statistics; "
        "nothing is downloaded here), DMS (a DMS-trained model), Finch (adds a delimiter token to the prompt, so not "
        "the same ids), ThinK (compresses key channels, not tokens), SimLayerKV (no compression ratio: a lazy-layer "
        "threshold), the decoding-time presses (DecodingPress, CAMPress, CompressionRatioDecodingPress, "
        "PrefillDecodingPress: they compress while generating) and PerLayerCompressionPress / ComposedPress (they "
        "take per-layer ratios or several presses).\n"
        "- Shared prefills, exact: one-chunk eviction happens after the chunk's attention, so a policy's prefill and "
        "observations do not depend on the budget; each attention-reading policy (h2o, lru, snapkv, tova) prefills a "
        "case once and every budget is a copy of that cache evicted by the cache's own eviction step; policies that "
        "read no attention share the `full` prefill with their own `on_insert` scores. kvpress's runner calls every "
        "press's own `compress()` in one prefill's hooks. Both are checked against the plain paths (Checks below); "
        "`--direct` turns kvscope's sharing off.\n\n"
        f"**Perplexity** on the first {args.ppl_tokens} tokens of the same prose (no template); both measures score "
        f"tokens N/2+1 .. N-1 ({args.ppl_tokens // 2 - 1} tokens). `ppl stream` (kvscope): the text is fed in "
        f"chunks of {args.ppl_chunk} tokens through a cache of fraction x {args.ppl_tokens} tokens that evicts after "
        "every chunk, so it stays at the budget as the text advances. `ppl prefix` (both): the first half is "
        "prefilled in one chunk and evicted/compressed to fraction x N/2, then the second half is scored "
        "teacher-forced in one forward on top of it (what a kvpress prefill press allows).\n\n")
    if verdict.get("evaluated"):
        v = verdict
        beats = ("n/a (kvpress not run)" if v["beats_every_press"] is None else "yes" if v["beats_every_press"] else
                 ("ties the best press" if v["ties_or_beats_every_press"] else "no"))
        md += (f"**Target** (25% budget, 2k passkey, {v['cases']} cases): best kvscope policy "
               f"`{v['best_policy']}` {100 * v['best_accuracy']:.0f}% vs full cache {100 * v['full_accuracy']:.0f}% "
               f"-> keeps >= 90% of full-cache accuracy: **{'yes' if v['keeps_90pct_of_full'] else 'no'}**; "
               f"beats every kvpress press (together mode; best press `{v['best_press']}` "
               f"{100 * (v['best_press_accuracy'] or 0):.0f}%): **{beats}**"
               + (f" (presses at or above it: {', '.join(v['presses_matched'])})" if v["presses_matched"] else "")
               + ("; vs pipeline-mode presses: " + ("beats all" if v["beats_every_pipeline_press"] else
                                                    "does not beat all")
                  if v.get("beats_every_pipeline_press") is not None else "") + ".\n\n")
    md += best_per_budget(groups, lengths, fractions)
    md += budget_tables(groups, lengths, fractions)
    md += "![quality](quality.svg)\n\n"
    if checks:
        md += "Checks: " + "; ".join(checks) + ".\n\n"
    if notes:
        md += "Notes: " + "; ".join(notes) + ".\n\n"
    md += (f"Raw results (every case, answer and timing): `{data}` (rebuild this section with `{rebuild}`). Plot: "
           "`docs/quality.svg`.\n")
    return md
