"""Quality benchmark on the embedded SmolLM2-135M (CPU): passkey retrieval and perplexity under every eviction policy
and budget, against NVIDIA kvpress presses on the same token ids.

    python benchmarks/quality.py                 # the full run, writes docs (40 min on 2 shared cores, 12 cases)
    python benchmarks/quality.py --quick         # about 3 minutes: 1k/2k, fewer policies, presses and cases
    python benchmarks/quality.py --render-from docs/data/quality.json   # rewrite the docs section from a run's JSON
    python benchmarks/quality.py --kv-dtypes bf16,fp8,int8,int4   # adds full-cache rows per KV storage format

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
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, ROOT, header, header_facts, save_json, table, write_section  # noqa: E402
from quality_cases import LABELS, answer_found, parse_spec, passkey_cases, perplexity_ids  # noqa: E402

KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_REQUIREMENTS = ROOT / "benchmarks" / "requirements-kvpress.txt"
# ObservedAttentionPress needs attn_implementation="eager" (it reads the attention weights), which makes every
# kvpress prefill about 2.5x slower on CPU; add it with --presses (the runner then switches to eager for all presses).
# Every kvpress 0.5.5 press that prunes the prompt's KV to a compression ratio on sdpa without downloading anything:
# the scorer presses, KVzip (its own multi-pass path), and kvpress's wrappers around the strongest scorers. Left out
# (docs say why): ObservedAttention/KVCompose (eager), QFilter/KVzap/FastKVzip/DuoAttention/LUKV/RestoreKV/
# ExpectedAttentionStats (downloads), DMS (a DMS-trained model), Finch (a delimiter token added to the prompt),
# ThinK (compresses key channels, not tokens), SimLayerKV (no ratio: a lazy-layer threshold),
# Decoding/CAM/CompressionRatioDecoding/PrefillDecoding (compress while decoding),
# PerLayerCompression/Composed (need per-layer ratios or several presses).
PRESSES = ["SnapKVPress", "StreamingLLMPress", "KnormPress", "TOVAPress", "ExpectedAttentionPress", "RandomPress",
           "PyramidKVPress", "KeyDiffPress", "LagKVPress", "CURPress", "LeverageScorePress", "CompactorPress",
           "CapPress", "NonCausalAttnPress", "KVzipPress", "KVgradPress",
           "AdaKVPress(ExpectedAttentionPress)", "AdaKVPress(SnapKVPress)", "AdaKVPress(TOVAPress)",
           "CriticalKVPress(SnapKVPress)", "CriticalKVPress(TOVAPress)", "CriticalAdaKVPress(ExpectedAttentionPress)",
           "CriticalAdaKVPress(SnapKVPress)", "ChunkKVPress(SnapKVPress)", "ChunkPress(SnapKVPress)",
           "BlockPress(KeyDiffPress)", "KeyRerotationPress(SnapKVPress)", "MergingPress(SnapKVPress)"]
VERIFY_PRESSES = ("SnapKVPress", "KnormPress", "AdaKVPress(TOVAPress)", "KeyRerotationPress(SnapKVPress)",
                  "KVzipPress")  # one of each path: plain, head-wise masks, re-rotated positions, KVzip's own
KV_DTYPES = ["bf16", "fp8", "int8", "int4"]
DEFAULT_KEYS = "1024:1,2048:2,4096:1"
FORK_CHECK_POLICIES = ["snapkv", "h2o", "lru", "knorm", "random"]


# --- helpers ---------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_keys(text: str, lengths: list[int]) -> dict[int, int]:
    if ":" not in text:
        return {n: int(text) for n in lengths}
    table_ = {int(k): int(v) for k, v in (p.split(":") for p in text.split(","))}
    return {n: table_.get(n, 1) for n in lengths}


def budget_for(fraction: float, length: int) -> int:
    return max(1, round(fraction * length))


def cache_kw(model) -> str:
    from kvscope import _compat

    return _compat.cache_keyword(model)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache):
    """One forward over the whole prompt; returns the last position's logits."""
    n = ids.shape[1]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n)[None], use_cache=True,
                logits_to_keep=1, **{cache_kw(model): cache})
    return out.logits[0, -1]


@torch.inference_mode()
def decode(model, cache, logits, n: int, max_new: int, eos: int) -> list[int]:
    """Greedy decoding after a prefill of `n` tokens (the same loop as kvscope.runtime.generate)."""
    tokens = [int(logits.argmax())]
    mask = torch.ones(1, n, dtype=torch.long)
    for step in range(max_new - 1):
        if tokens[-1] == eos:
            break
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask,
                    position_ids=torch.tensor([[n + step]]), use_cache=True, logits_to_keep=1,
                    **{cache_kw(model): cache})
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def evicted_copy(cache, budget: int, policy: str | None = None):
    """A copy of a prefilled cache (nothing evicted yet) evicted down to `budget`, as a one-chunk prefill under that
    budget would have left it (`BudgetedCache.compress_to`; checked against direct runs by fork_check). With
    `policy` (one that reads no attention), the copy switches to that policy first."""
    return cache.compress_to(budget, make_policy(policy) if policy is not None else None)


SKIPPED: set[str] = set()


def make_policy(spec: str):
    """A policy from `name` or `name[knob=value;knob=value]` (e.g. `snapkv[window=64;kernel=5]`, for ablations)."""
    from kvscope import policies

    name, knobs = parse_spec(spec)
    return policies.get(name, **knobs)


def fits(policy: str, budget: int) -> bool:
    """Whether the policy can run at this budget (snapkv needs more than its window, say); noted when not."""
    minimum = make_policy(policy).min_budget()
    if budget < minimum:
        SKIPPED.add(f"{policy} needs a budget of at least {minimum} tokens, skipped at {budget}")
        return False
    return True


def attention_free(policy: str) -> bool:
    return make_policy(policy).attention == "none"


def run_direct(model, ids, policy, budget, chunk, max_new, eos, kv_dtype=None) -> list[int]:
    from kvscope.cache import BudgetedCache
    from kvscope.runtime import generate

    cache = BudgetedCache(model, make_policy(policy), budget_tokens=budget, chunk_size=chunk, kv_dtype=kv_dtype)
    g = generate(model, ids, cache, max_new_tokens=max_new, chunk_size=chunk, eos_token_id=eos)
    del cache
    gc.collect()
    seq = g.sequences[0].tolist()
    return seq[:seq.index(eos) + 1] if eos in seq else seq


# --- kvscope passkey -------------------------------------------------------------------------------------------------
def kvscope_passkey(model, tok, cases, policies, fractions, max_new, direct: bool) -> list[dict]:
    """Every policy x budget on every case. Shared prefills (unless `direct`): one per attention-reading policy, and
    one (the `full` policy's) for every policy that reads no attention."""
    from kvscope.cache import BudgetedCache

    eos = tok.eos_token_id
    rows = []
    for i, case in enumerate(cases):
        ids = torch.tensor([case.input_ids])
        n = case.length
        t_case = time.perf_counter()
        if direct:
            for policy in policies:
                budgets = [(1.0, n + max_new)] if policy == "full" else [(f, budget_for(f, n)) for f in fractions]
                for f, b in budgets:
                    if not fits(policy, b):
                        continue
                    t = time.perf_counter()
                    gen = run_direct(model, ids, policy, b, n, max_new, eos)
                    rows.append(_row(case, "kvscope", policy, f, b, n, gen, tok, time.perf_counter() - t))
            log(f"kvscope passkey {i + 1}/{len(cases)} {case.case_id} ({n} tokens) in "
                f"{time.perf_counter() - t_case:.0f} s")
            continue
        free = [p for p in policies if p != "full" and attention_free(p)]
        groups = [("full", free)] + [(p, [p]) for p in policies if p != "full" and p not in free]
        for prefill_policy, members in groups:
            t = time.perf_counter()
            base = BudgetedCache(model, make_policy(prefill_policy), budget_tokens=n + max_new, chunk_size=n)
            logits = prefill(model, ids, base)
            pre_s = time.perf_counter() - t
            for policy in members:
                for f in fractions:
                    b = budget_for(f, n)
                    if not fits(policy, b):
                        continue
                    t = time.perf_counter()
                    swap = policy if policy != prefill_policy else None
                    gen = decode(model, evicted_copy(base, b, swap), logits, n, max_new, eos)
                    rows.append(_row(case, "kvscope", policy, f, b, n, gen, tok, time.perf_counter() - t,
                                     prefill_s=pre_s))
            if prefill_policy == "full" and "full" in policies:
                t = time.perf_counter()
                gen = decode(model, base, logits, n, max_new, eos)  # last: decoding changes `base`
                rows.append(_row(case, "kvscope", "full", 1.0, n + max_new, n, gen, tok, time.perf_counter() - t,
                                 prefill_s=pre_s))
            del base
            gc.collect()  # a cache and its layers form reference cycles: free their storage now, not at the next GC
        log(f"kvscope passkey {i + 1}/{len(cases)} {case.case_id} ({n} tokens) in {time.perf_counter() - t_case:.0f} s")
    return rows


def _row(case, tool, policy, fraction, budget, chunk, gen, tok, seconds, prefill_s=None, **extra) -> dict:
    text = tok.decode(gen, skip_special_tokens=True)
    row = {"tool": tool, "policy": policy, "mode": extra.pop("mode", "one-chunk"), "chunk": chunk,
           "kv_dtype": extra.pop("kv_dtype", None), "fraction": fraction, "budget_tokens": budget,
           "case_id": case.case_id, "length": case.length, "target_length": case.target_length, "depth": case.depth,
           "key": case.key, "answer": text, "found": answer_found(text, case.key), "seconds": round(seconds, 3)}
    row.update(distractor_hit(case, text))
    if prefill_s is not None:
        row["prefill_s"] = round(prefill_s, 3)
    row.update(extra)
    return row


def distractor_hit(case, text: str) -> dict:
    """Multi-key cases: whether the answer gave another door's key (the model kept the numbers but mixed them up)."""
    if not case.distractors:
        return {}
    return {"distractor_found": any(answer_found(text, d["key"]) for d in case.distractors)}


def fork_check(model, tok, case, rows, fraction, max_new) -> list[dict]:
    """Direct `generate()` runs for a few policies vs the shared-prefill rows of the same case."""
    ids = torch.tensor([case.input_ids])
    out = []
    for policy in FORK_CHECK_POLICIES:
        mine = next((r for r in rows if r["case_id"] == case.case_id and r["policy"] == policy
                     and r["fraction"] == fraction), None)
        if mine is None:
            continue
        gen = run_direct(model, ids, policy, budget_for(fraction, case.length), case.length, max_new, tok.eos_token_id)
        text = tok.decode(gen, skip_special_tokens=True)
        out.append({"case_id": case.case_id, "policy": policy, "fraction": fraction, "direct": text,
                    "shared_prefill": mine["answer"], "agrees": text == mine["answer"]})
    return out


def bounded_passkey(model, tok, cases, policy, fractions, chunk, max_new) -> list[dict]:
    rows = []
    for case in cases:
        ids = torch.tensor([case.input_ids])
        for f in fractions:
            b = budget_for(f, case.length)
            if not fits(policy, b):
                continue
            t = time.perf_counter()
            gen = run_direct(model, ids, policy, b, chunk, max_new, tok.eos_token_id)
            rows.append(_row(case, "kvscope", policy, f, b, chunk, gen, tok, time.perf_counter() - t,
                             mode=f"chunk {chunk}"))
            gc.collect()
    return rows


def kv_dtype_passkey(model, tok, cases, kv_dtype, max_new) -> tuple[list[dict], str | None]:
    rows = []
    for case in cases:
        ids = torch.tensor([case.input_ids])
        t = time.perf_counter()
        try:
            gen = run_direct(model, ids, "full", case.length + max_new, case.length, max_new, tok.eos_token_id,
                             kv_dtype=kv_dtype)
        except (ImportError, ModuleNotFoundError) as exc:
            return [], f"skipped: {type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a store in progress must not end a long run; the note says why
            return [], f"failed: {type(exc).__name__}: {exc}"
        rows.append(_row(case, "kvscope", "full", 1.0, case.length + max_new, case.length, gen, tok,
                         time.perf_counter() - t, kv_dtype=kv_dtype))
    return rows, None


# --- perplexity ------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


@torch.inference_mode()
def ppl_stream(model, ids: list[int], policy: str, budget: int, chunk: int, kv_dtype=None) -> dict:
    """Chunks of `chunk` tokens through a budgeted cache; NLL of tokens N/2+1 .. N-1."""
    from kvscope.cache import BudgetedCache

    x = torch.tensor([ids])
    n, half = len(ids), len(ids) // 2
    cache = BudgetedCache(model, make_policy(policy), budget_tokens=budget, chunk_size=chunk, kv_dtype=kv_dtype)
    total, count = 0.0, 0
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)  # predict targets s+1 .. e
        out = model(input_ids=x[:, s:e], attention_mask=torch.ones(1, e, dtype=torch.long),
                    position_ids=torch.arange(s, e)[None], use_cache=True, **{cache_kw(model): cache})
        pos = torch.arange(s, e)
        keep = pos + 1 >= half + 1
        if keep.any():
            nll = _nll(out.logits[0][keep], x[0, s + 1:e + 1][keep])
            total, count = total + float(nll.sum()), count + int(nll.numel())
    return {"nll_sum": total, "tokens": count}


@torch.inference_mode()
def prefix_base(model, ids: list[int], policy: str, budget: int):
    """A cache holding the first half of the text after a one-chunk prefill under `budget`."""
    from kvscope.cache import BudgetedCache

    half = len(ids) // 2
    cache = BudgetedCache(model, make_policy(policy), budget_tokens=budget, chunk_size=max(half, len(ids) - half))
    prefill(model, torch.tensor([ids[:half]]), cache)
    return cache


@torch.inference_mode()
def score_second_half(model, ids: list[int], cache) -> dict:
    """Teacher-forced NLL of tokens N/2+1 .. N-1 in one forward on top of `cache` (which holds the first half)."""
    x = torch.tensor([ids])
    n, half = len(ids), len(ids) // 2
    out = model(input_ids=x[:, half:], attention_mask=torch.ones(1, n, dtype=torch.long),
                position_ids=torch.arange(half, n)[None], use_cache=True, **{cache_kw(model): cache})
    nll = _nll(out.logits[0, :-1], x[0, half + 1:])
    return {"nll_sum": float(nll.sum()), "tokens": int(nll.numel())}


def kvscope_ppl(model, ids, policies, fractions, chunk, direct) -> list[dict]:
    """`stream` for every policy and budget; `prefix`: the first half evicted to fraction x N/2, second half scored
    (shared prefills as in the passkey runs unless `direct`)."""
    rows = []
    n, half = len(ids), len(ids) // 2
    free = [p for p in policies if p != "full" and attention_free(p)]
    shared_full = None
    for policy in policies:
        t = time.perf_counter()
        budgets = [(1.0, n + chunk)] if policy == "full" else [(f, budget_for(f, n)) for f in fractions]
        for f, b in budgets:
            if not fits(policy, b):
                continue
            r = ppl_stream(model, ids, policy, b, chunk)
            rows.append({"tool": "kvscope", "policy": policy, "measure": "stream", "fraction": f, "budget_tokens": b,
                         "chunk": chunk} | r)
        base = None
        prefix_budgets = [(1.0, n)] if policy == "full" else [(f, budget_for(f, half)) for f in fractions]
        for f, b in prefix_budgets:
            if not fits(policy, b):
                continue
            if direct or policy == "full":
                cache = prefix_base(model, ids, policy, b)
            elif policy in free:
                shared_full = shared_full or prefix_base(model, ids, "full", n)
                cache = evicted_copy(shared_full, b, policy)
            else:
                base = base if base is not None else prefix_base(model, ids, policy, n)
                cache = evicted_copy(base, b)
            rows.append({"tool": "kvscope", "policy": policy, "measure": "prefix", "fraction": f, "budget_tokens": b}
                        | score_second_half(model, ids, cache))
        gc.collect()
        log(f"kvscope perplexity {policy} in {time.perf_counter() - t:.0f} s")
    return rows


# --- kvpress ---------------------------------------------------------------------------------------------------------
def kvpress_python(args) -> Path:
    py = Path(args.kvpress_python) if args.kvpress_python else KVPRESS_VENV / "bin" / "python"
    if py.exists():
        return py
    if not args.setup_kvpress:
        raise SystemExit(f"kvpress's virtualenv is missing ({py}); expected it created by `make bench-quality` or "
                         f"by this script with --setup-kvpress (python3 -m venv {KVPRESS_VENV.name} && pip install -r "
                         f"{KVPRESS_REQUIREMENTS.relative_to(ROOT)}); or run with --no-kvpress")
    log(f"creating {KVPRESS_VENV} (kvpress 0.5.5, transformers 5.2.0, torch 2.13.0 CPU)")
    subprocess.run(["python3", "-m", "venv", str(KVPRESS_VENV)], check=True)
    pip = [str(KVPRESS_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["-r", str(KVPRESS_REQUIREMENTS)], check=True)
    (KVPRESS_VENV / ".kvpress-installed").touch()
    return KVPRESS_VENV / "bin" / "python"


def run_kvpress(args, tok, cases, ppl_ids, fractions, model_dir: Path) -> dict:
    py = kvpress_python(args)
    verify_case = next((c for c in cases if c.target_length == 2048), cases[0])
    job = {"model_dir": str(model_dir), "cases": [c.to_json() for c in cases], "presses": args.presses,
           "fractions": fractions, "max_new_tokens": args.max_new_tokens, "modes": args.kvpress_modes,
           "pipeline_lengths": args.pipeline_lengths, "eos_token_ids": [tok.eos_token_id], "threads": args.threads,
           "verify": not args.no_verify, "verify_case": verify_case.to_json(),
           "verify_presses": [p for p in VERIFY_PRESSES if p in args.presses] or args.presses[:1],
           "verify_fraction": 0.25, "ppl_ids": ppl_ids}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "job.json", Path(tmp) / "result.json"
        src.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        proc = subprocess.run([str(py), str(ROOT / "benchmarks" / "kvpress_runner.py"), str(src), str(dst)], env=env,
                              stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"kvpress runner failed with exit code {proc.returncode} (its messages are above)")
        result = json.loads(dst.read_text())
    by_id = {c.case_id: c for c in cases}
    rows = []
    for r in result["passkey"]:
        case = by_id[r["case_id"]]
        text = tok.decode(r["generated_ids"], skip_special_tokens=True)
        rows.append({"tool": "kvpress", "policy": r["press"], "mode": r["mode"], "chunk": None, "kv_dtype": None,
                     "fraction": r["fraction"], "budget_tokens": r["kept_tokens"], "case_id": case.case_id,
                     "length": case.length, "target_length": case.target_length, "depth": case.depth, "key": case.key,
                     "answer": text, "found": answer_found(text, case.key), "seconds": r["decode_s"]}
                    | distractor_hit(case, text)
                    | ({"prefill_s": r["prefill_s"]} if "prefill_s" in r else {}))
    result["passkey_rows"] = rows
    result["ppl_rows"] = [{"tool": "kvpress", "policy": r["press"], "measure": "prefix", "fraction": r["fraction"],
                           "budget_tokens": r["kept_tokens"], "nll_sum": r["nll_sum"], "tokens": r["tokens"]}
                          for r in result["ppl"]]
    return result


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


# --- plot (inline SVG, no matplotlib needed) ------------------------------------------------------------------------
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
# one colour per algorithm, shared by the two tools (kvscope solid with dots, kvpress dashed with squares)
FAMILY_COLOR = {"snapkv": 0, "SnapKVPress": 0, "tova": 1, "TOVAPress": 1, "streaming_llm": 2, "StreamingLLMPress": 2,
                "knorm": 3, "KnormPress": 3, "h2o": 4, "ObservedAttentionPress": 4, "lru": 5, "sliding_window": 6,
                "random": 7, "RandomPress": 7, "ExpectedAttentionPress": 9}
EXTRA_COLORS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
                "#636363"]  # presses without a kvscope counterpart, in legend order
PLOT_PRESSES = 8  # kvpress lines in the plot: the presses with the best mean passkey accuracy over the budgets


def svg_plot(groups: list[dict], fractions: list[float], length: int) -> str:
    """Two panels: passkey accuracy at `length` and prefix perplexity vs budget fraction, one line per policy/press."""
    xs = sorted(fractions) + [1.0]
    key = f"acc_{length}"
    series: dict[str, dict] = {}
    for g in groups:
        if g["kv_dtype"] or g["mode"] not in ("one-chunk", "together"):
            continue
        name = label(g)
        series.setdefault(name, {"tool": g["tool"], "policy": g["policy"], "acc": {}, "ppl": {}})
        if key in g:
            series[name]["acc"][g["fraction"]] = g[key]
        if "ppl_prefix" in g:
            series[name]["ppl"][g["fraction"]] = g["ppl_prefix"]
    full = {t: next((g for g in groups if g["tool"] == t and g["fraction"] == 1.0 and g["mode"] in
                     ("one-chunk", "together") and not g["kv_dtype"]), None) for t in ("kvscope", "kvpress")}
    names = [n for n in series if not n.endswith(" full") and "no press" not in n]
    presses = [n for n in names if series[n]["tool"] == "kvpress"]
    if len(presses) > PLOT_PRESSES:  # the strongest presses only: dozens of lines would hide each other

        def mean_acc(n):
            return sum(series[n]["acc"].get(f) or 0 for f in fractions) / len(fractions)

        shown = set(sorted(presses, key=lambda n: (-mean_acc(n), n))[:PLOT_PRESSES])
        names = [n for n in names if series[n]["tool"] != "kvpress" or n in shown]
    extra = iter(EXTRA_COLORS * 4)
    color_of = {n: PALETTE[FAMILY_COLOR[series[n]["policy"]]] if series[n]["policy"] in FAMILY_COLOR else next(extra)
                for n in names}
    for n in names:  # every line ends at the full cache of its own tool
        f = full[series[n]["tool"]]
        if f:
            series[n]["acc"].setdefault(1.0, f.get(key))
            series[n]["ppl"].setdefault(1.0, f.get("ppl_prefix"))
    ppl_vals = [v for n in names for v in series[n]["ppl"].values() if v]
    w, h, pad = 460, 300, 50
    width = 2 * w + 330

    def px(i):
        return pad + i * (w - 2 * pad) / (len(xs) - 1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 30}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{width}" height="{h + 30}" fill="white"/>']
    panels = [(f"passkey accuracy at {length // 1024}k tokens", 0, 0.0, 1.0, "acc"),
              ("perplexity, prefix measure (log scale, lower is better)", w, min(ppl_vals or [1]),
               max(ppl_vals or [2]), "ppl")]
    for title, ox, lo, hi, field in panels:
        if hi <= lo:
            hi = lo + 1
        scale = math.log if field == "ppl" else (lambda v: v)

        def py(v, lo=lo, hi=hi, scale=scale):
            return h - pad - (scale(v) - scale(lo)) / (scale(hi) - scale(lo)) * (h - 2 * pad)

        parts.append(f'<text x="{ox + w / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>')
        parts.append(f'<line x1="{ox + pad}" y1="{h - pad}" x2="{ox + w - pad}" y2="{h - pad}" stroke="black"/>')
        parts.append(f'<line x1="{ox + pad}" y1="{pad}" x2="{ox + pad}" y2="{h - pad}" stroke="black"/>')
        for i, x in enumerate(xs):
            parts.append(f'<text x="{ox + px(i)}" y="{h - pad + 17}" text-anchor="middle">{100 * x:g}%</text>')
        for k in range(5):
            v = lo + k * (hi - lo) / 4 if field == "acc" else math.exp(math.log(lo) + k * math.log(hi / lo) / 4)
            parts.append(f'<text x="{ox + pad - 5}" y="{py(v) + 4}" text-anchor="end">'
                         f'{v:.2f}</text><line x1="{ox + pad}" y1="{py(v)}" x2="{ox + w - pad}" y2="{py(v)}" '
                         f'stroke="#ddd"/>')
        parts.append(f'<text x="{ox + w / 2}" y="{h - 12}" text-anchor="middle">KV budget (fraction of the prompt)'
                     f'</text>')
        for j, n in enumerate(names):
            pts = [(px(i), py(series[n][field][x])) for i, x in enumerate(xs)
                   if series[n][field].get(x) is not None]
            if len(pts) < 2:
                continue
            color = color_of[n]
            dash = ' stroke-dasharray="5,3"' if series[n]["tool"] == "kvpress" else ""
            shift = (j - len(names) / 2) * 1.2  # identical values stay visible side by side
            pts = [(x + ox + shift, y) for x, y in pts]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
            for x, y in pts:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' if series[n]["tool"] ==
                             "kvscope" else f'<rect x="{x - 2.5:.1f}" y="{y - 2.5:.1f}" width="5" height="5" '
                             f'fill="{color}"/>')
    if len(presses) > PLOT_PRESSES:
        parts.append(f'<text x="{2 * w + 10}" y="22">kvpress: top {PLOT_PRESSES} of {len(presses)} presses by mean '
                     f'accuracy</text>')
    for j, n in enumerate(names):
        color = color_of[n]
        dash = ' stroke-dasharray="5,3"' if series[n]["tool"] == "kvpress" else ""
        y = 40 + j * 15
        parts.append(f'<line x1="{2 * w + 10}" y1="{y}" x2="{2 * w + 35}" y2="{y}" stroke="{color}" '
                     f'stroke-width="1.8"{dash}/><text x="{2 * w + 40}" y="{y + 4}">{n}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


TITLE = "Quality: passkey retrieval and perplexity under KV budgets (embedded SmolLM2-135M, CPU)"


def presses_ran(presses: list[str]) -> str:
    if sorted(presses) == sorted(PRESSES):
        return f"the default list, {len(PRESSES)} presses and wrappers"
    return f"{len(presses)} ({', '.join(presses)}), not the default list of {len(PRESSES)}"


def render(args, meta: dict, groups, verdict, checks, notes, per_len: dict, head: str) -> str:
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
    md += ("Raw results (every case, answer and timing): `docs/data/quality.json`. Plot: `docs/quality.svg`.\n")
    return md


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
    p.add_argument("--plot", default=str(ROOT / "docs" / "quality.svg"))
    p.add_argument("--docs", default=str(DOCS))
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
    from kvscope import _compat, policies
    from kvscope.errors import UsageError
    from kvscope.models import load
    from kvscope.models.embedded import ensure_converted

    _compat.quiet_transformers()
    started = time.perf_counter()
    run_header = header(TITLE)  # the commit the run starts from: the code it loads (HEAD may move during a long run)
    pol = policies.available() if args.policies == "all" else args.policies.split(",")
    pol = ["full"] + [p for p in pol if p != "full"]
    for spec in pol:  # a misspelt policy or knob stops the run before anything runs, with the library's message
        try:
            make_policy(spec)
        except UsageError as exc:
            print(f"quality.py: error: --policies: {exc}", file=sys.stderr)
            return 2
    model, tok, _ = load("smollm2-135m", dtype="fp32", device="cpu")
    keys = parse_keys(args.keys, args.lengths)
    cases = [c for n in args.lengths for c in passkey_cases(tok, [n], args.depths, keys[n], seed=args.seed,
                                                                     doors=args.doors)]
    ppl_ids = None if args.no_ppl else perplexity_ids(tok, args.ppl_tokens)
    log(f"{len(cases)} passkey cases, {len(pol)} kvscope policies, {len(args.presses)} presses, budgets "
        f"{args.budgets}")
    passkey, ppl, checks, notes, meta = [], [], [], [], {}
    timings = {}

    t = time.perf_counter()
    passkey += kvscope_passkey(model, tok, cases, pol, args.budgets, args.max_new_tokens, args.direct)
    timings["kvscope_passkey_s"] = round(time.perf_counter() - t, 1)
    checkpoint(args, passkey, ppl, timings)

    fork = []
    check_case = next((c for c in cases if c.target_length == 2048), None)
    if not args.direct and not args.no_verify and check_case and 0.25 in args.budgets:
        fork = fork_check(model, tok, check_case, passkey, 0.25, args.max_new_tokens)
        agree = sum(r["agrees"] for r in fork)
        checks.append(f"kvscope prefill sharing vs direct generate() on {check_case.case_id} at 25%: {agree}/"
                      f"{len(fork)} answers identical ({', '.join(r['policy'] for r in fork)})")

    if args.bounded_chunk and 2048 in args.lengths and len(pol) > 1:
        groups = summarize(passkey, [], args.lengths)
        name = args.bounded_policy
        if name == "best":
            cand = [g for g in groups if g["tool"] == "kvscope" and g["policy"] != "full" and g["fraction"] == 0.25
                    and "acc_2048" in g] or [g for g in groups if g["tool"] == "kvscope" and g["policy"] != "full"]
            name = max(cand, key=lambda g: (g.get("acc_2048", 0), g["acc_all"] or 0))["policy"]
        t = time.perf_counter()
        passkey += bounded_passkey(model, tok, [c for c in cases if c.target_length == 2048], name, args.budgets,
                                   args.bounded_chunk, args.max_new_tokens)
        timings["kvscope_bounded_s"] = round(time.perf_counter() - t, 1)
        checkpoint(args, passkey, ppl, timings)
        log(f"bounded-peak rows ({name}, chunk {args.bounded_chunk}) in {timings['kvscope_bounded_s']} s")

    for kv in args.kv_dtypes:
        t = time.perf_counter()
        kv_cases = [c for c in cases if c.target_length in args.kv_dtype_lengths]
        rows, note = kv_dtype_passkey(model, tok, kv_cases, kv, args.max_new_tokens)
        if note:
            notes.append(f"kv_dtype {kv} {note}")
            log(f"kv_dtype {kv}: {note}")
            continue
        passkey += rows
        if ppl_ids:
            r = ppl_stream(model, ppl_ids, "full", len(ppl_ids) + args.ppl_chunk, args.ppl_chunk, kv_dtype=kv)
            ppl.append({"tool": "kvscope", "policy": "full", "measure": "stream", "fraction": 1.0, "kv_dtype": kv,
                        "budget_tokens": len(ppl_ids) + args.ppl_chunk, "chunk": args.ppl_chunk} | r)
        timings[f"kv_{kv}_s"] = round(time.perf_counter() - t, 1)
        checkpoint(args, passkey, ppl, timings)

    if ppl_ids:
        t = time.perf_counter()
        ppl += kvscope_ppl(model, ppl_ids, pol, args.budgets, args.ppl_chunk, args.direct)
        timings["kvscope_ppl_s"] = round(time.perf_counter() - t, 1)
        checkpoint(args, passkey, ppl, timings)

    kvpress_result = None
    if not args.no_kvpress:
        t = time.perf_counter()
        log("kvpress runner starting")
        kvpress_result = run_kvpress(args, tok, cases, ppl_ids, args.budgets, ensure_converted())
        passkey += kvpress_result["passkey_rows"]
        ppl += kvpress_result["ppl_rows"]
        meta["kvpress_versions"] = kvpress_result["versions"]
        meta["kvpress_attn"] = kvpress_result["attn_implementation"]
        timings["kvpress_s"] = round(time.perf_counter() - t, 1)
        ver = kvpress_result.get("verify", [])
        if ver:
            vcase = next((c for c in cases if c.target_length == 2048), cases[0])
            checks.append(f"kvpress shared prefill vs kvpress's own hooks/pipeline on {vcase.case_id} at 25% "
                          f"({', '.join(sorted({v['press'] for v in ver}))}): "
                          f"{sum(bool(v['agrees']) for v in ver)}/{len(ver)} answers identical")

    notes.extend(sorted(SKIPPED))
    meta["seconds"] = time.perf_counter() - started
    groups = summarize(passkey, ppl, args.lengths)
    verdict = target_verdict(groups)
    kv_targets = kv_dtype_targets(groups)
    if kv_targets:
        notes.extend(kv_targets)
    result = {"args": {k: v for k, v in vars(args).items()}, "timings": timings, "verdict": verdict,
              "checks": checks, "notes": notes, "fork_check": fork, "meta": meta,
              "cases": [c.to_json() | {"input_ids": None} for c in cases],
              "summary": [{k: v for k, v in g.items()} for g in groups], "passkey": passkey, "ppl": ppl,
              "kvpress_verify": kvpress_result.get("verify") if kvpress_result else None, "header": run_header}
    save_json(result, args.json)
    log(f"done in {meta['seconds'] / 60:.1f} min; JSON in {args.json}")
    head = result["header"]
    per_len = {n: sum(1 for c in cases if c.target_length == n) for n in args.lengths}
    publish(args, meta, groups, verdict, checks, notes, per_len, head)
    return 0


def publish(args, meta, groups, verdict, checks, notes, per_len, head) -> None:
    md = render(args, meta, groups, verdict, checks, notes, per_len, head)
    print(md)
    if not args.no_docs:
        Path(args.plot).write_text(svg_plot(groups, args.budgets, 2048 if 2048 in args.lengths else args.lengths[0]))
        write_section("quality", md, args.docs)


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
    publish(saved, data["meta"], groups, data["verdict"], data["checks"], data["notes"], per_len, data["header"])
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


if __name__ == "__main__":
    sys.exit(main())
