"""The quality benchmark's runs on kvscope's side: passkey cases and perplexity under every policy and budget, with
shared prefills (a prefilled cache evicted down to each budget) checked against direct `generate()` runs."""

from __future__ import annotations

import gc
import sys
import time

import torch

from benchmarks.quality_cases import answer_found, parse_spec

FORK_CHECK_POLICIES = ["snapkv", "h2o", "lru", "knorm", "random"]

def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def run_direct(model, ids, policy, budget, chunk, max_new, eos, kv_dtype=None, recall=None) -> list[int]:
    from kvscope.cache import BudgetedCache
    from kvscope.runtime import generate

    cache = BudgetedCache(model, make_policy(policy), budget_tokens=budget, chunk_size=chunk, kv_dtype=kv_dtype,
                          recall=recall)
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
def ppl_stream(model, ids: list[int], policy: str, budget: int, chunk: int, kv_dtype=None, recall=None) -> dict:
    """Chunks of `chunk` tokens through a budgeted cache; NLL of tokens N/2+1 .. N-1. With `recall`, the text is one
    prompt: the chunks' evictions wait in CPU memory and the last chunk recalls before it attends."""
    from kvscope.cache import BudgetedCache

    x = torch.tensor([ids])
    n, half = len(ids), len(ids) // 2
    cache = BudgetedCache(model, make_policy(policy), budget_tokens=budget, chunk_size=chunk, kv_dtype=kv_dtype,
                          recall=recall)
    total, count = 0.0, 0
    cache.begin_prefill(n - 1, 1, next(model.parameters()).dtype)
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)  # predict targets s+1 .. e
        if e == n - 1:
            cache.last_prefill_forward()
        out = model(input_ids=x[:, s:e], attention_mask=torch.ones(1, e, dtype=torch.long),
                    position_ids=torch.arange(s, e)[None], use_cache=True, **{cache_kw(model): cache})
        pos = torch.arange(s, e)
        keep = pos + 1 >= half + 1
        if keep.any():
            nll = _nll(out.logits[0][keep], x[0, s + 1:e + 1][keep])
            total, count = total + float(nll.sum()), count + int(nll.numel())
    cache.end_prefill()
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
