"""Multi-turn chat: time to first token per turn with kvscope's KV reuse, against (a) recomputing the whole history
with plain `model.generate()` and (b) plain `generate()` with a `DynamicCache` carried across turns by hand.

Every turn adds `--user-tokens` fixed token ids (seeded) to the history. Each way generates `--check-tokens` greedy
tokens (eos ignored), which must be identical to (a)'s under the `full` policy; the reply that enters the history is
(a)'s generated tokens followed by fixed ids up to `--reply-tokens`, so the three ways see identical histories.
(b) and kvscope keep what they generated in their caches (as in a real chat), so each turn they prefill the rest of
the reply and the new user tokens; (a) prefills the whole history. Time to first token is wall time from the call
to the first new token on the host, for all three.

Then the swap-in cost of an idle session: on CUDA, its KV is swapped to pinned CPU memory and the next turn swaps it
in; against dropping it and recomputing the history. On the CPU a swap frees nothing (it is a no-op), so an idle
session there is dropped and recomputed, and only that is measured.

    python -m benchmarks.multiturn           # embedded model on the CPU (turns bound by its 8192 positions)
    python -m benchmarks.multiturn --model llama-3.1-8b --random-weights --device cuda --user-tokens 900,3900
    python -m benchmarks.multiturn --render docs/data/multiturn-cuda.json       # the section again from a saved run

Writes section `multiturn-cpu` or `multiturn-cuda` of docs/benchmarks.md and its data,
docs/data/multiturn-cpu.json or multiturn-cuda.json (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import data_path, run_meta, save_json, section_head, table, write_section
from kvscope import _compat
from kvscope.chat import ChatEngine
from kvscope.chat.session import common_prefix
from kvscope.errors import UsageError
from kvscope.models import load

SWAP_BYTES = 64 << 30  # pinned host memory for the idle session's swap: a 40k-token 8B session is about 5.4 GB


class FirstToken:
    """A `generate()` streamer that notes when the first new token reaches the host (its first put is the prompt)."""

    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def fixed_ids(count: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (count,), generator=g).tolist()  # clear of the low special-token ids


def hf_turn(model, ids: list[int], new: int, cache=None) -> tuple[float, list[int]]:
    """Plain generate(): (time to first token, generated ids); `cache` continued when given."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    streamer = FirstToken()
    extra = {_compat.cache_keyword(model): cache} if cache is not None else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config, streamer=streamer,
                             **extra)
    return streamer.at - start, out[0, len(ids):].tolist()


def kvscope_turn(engine, session, ids: list[int], new: int) -> tuple[float, list[int], object]:
    start = time.perf_counter()
    r = engine.generate_ids(session, ids, max_new_tokens=new, ignore_eos=True)
    return r.first_token_at - start, r.ids, r


def warm_up(model, vocab: int, args) -> None:
    """Both runtimes once on a short prompt (kernels compiled, allocator primed), outside every timing."""
    hf_turn(model, fixed_ids(64, vocab, 0), 2)
    engine = ChatEngine(model, None, policy="full", session_budget=256, chunk_size=args.chunk_size,
                        kv_dtype=args.kv_dtype)
    session = engine.open()
    kvscope_turn(engine, session, fixed_ids(64, vocab, 0), 2)
    kvscope_turn(engine, session, fixed_ids(96, vocab, 0), 2)
    del engine, session
    _free(None)


def plan_turns(args, max_positions: int, user: int) -> int:
    per_turn = user + args.reply_tokens
    fit = (max_positions - user - args.check_tokens) // per_turn + 1
    return max(1, min(args.turns, fit))


def run_case(model, vocab: int, args, user: int, turns: int) -> dict:
    reply, check = args.reply_tokens, args.check_tokens
    budget = turns * (user + reply) + check
    engine = ChatEngine(model, None, policy="full", session_budget=budget, chunk_size=args.chunk_size,
                        kv_dtype=args.kv_dtype, swap_bytes=SWAP_BYTES)
    session = engine.open("bench")
    carried = _compat.dynamic_cache(model)
    history: list[int] = []
    rows = []
    for t in range(1, turns + 1):
        ids = history + fixed_ids(user, vocab, seed=2 * t)
        ttft_a, out_a = hf_turn(model, ids, check)
        ttft_b, out_b = hf_turn(model, ids, check, carried)
        ttft_k, out_k, r = kvscope_turn(engine, session, ids, check)
        # the reply that enters the history: (a)'s generated tokens, then fixed ids up to --reply-tokens
        reply_ids = (out_a + fixed_ids(max(0, reply - check), vocab, seed=2 * t + 1))[:reply]
        # (b) keeps what it generated where it agrees with the reply; a negative crop removes that many tokens (the
        # same in transformers 5.17 and 5.24)
        keep = len(ids) + common_prefix(out_b[:-1], reply_ids)
        if carried.get_seq_length() > keep:
            carried.crop(-(carried.get_seq_length() - keep))
        rows.append({"turn": t, "prompt_tokens": len(ids), "recompute_s": ttft_a, "carried_s": ttft_b,
                     "kvscope_s": ttft_k, "kvscope_prefilled": r.computed_tokens, "kvscope_reused": r.reused_tokens,
                     "kvscope_rewinds": session.counters.rewinds,
                     "carried_same": out_b == out_a, "kvscope_same": out_k == out_a})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
        history = ids + reply_ids
        _free(ids)
    swap = idle_costs(engine, session, history)
    del carried, engine, session
    _free(None)
    return {"user_tokens": user, "reply_tokens": reply, "check_tokens": check, "turns": turns, "rows": rows,
            "idle_session": swap}


def idle_costs(engine, session, history: list[int]) -> dict:
    """Time to first token of the next turn (the history with the last fixed reply) after the idle session was
    swapped out (CUDA) or dropped."""
    out = {"history_tokens": len(history)}
    if not torch.cuda.is_available():
        out["swap_note"] = "no CUDA device: swap is a no-op on the CPU (nothing to free), an idle session is dropped"
    elif engine.evict(session, swap=True) == "swap":
        kv_bytes = engine.store.charge_for(session.capacity_tokens).bytes
        ttft, _, r = kvscope_turn(engine, session, history, 1)
        out |= {"swap_in_s": r.restore_seconds, "swap_ttft_s": ttft, "swap_prefilled": r.computed_tokens,
                "kv_bytes": kv_bytes}
    else:
        out["swap_note"] = f"the session's KV did not fit the {SWAP_BYTES:,}-byte swap space: it was dropped"
    engine.evict(session, swap=False)
    ttft, _, r = kvscope_turn(engine, session, history, 1)
    return out | {"recompute_ttft_s": ttft, "recomputed_tokens": r.computed_tokens}


def _free(_):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section(result: dict) -> str:
    return f"multiturn-{result['device_kind']}"


def render(result: dict) -> str:
    name = section(result)
    data = f"docs/data/{name}.json"
    text = section_head(f"Multi-turn chat: time to first token per turn ({result['device_kind']})", result["meta"],
                        data, f"python -m benchmarks.multiturn --render {data}", name)
    load = result.get("load_average")
    if load:
        text += (f"Load average (1 min) at the start and end of the run: {load[0]:.2f} and {load[1]:.2f} "
                 f"on {result['cpus']} cores (the machine is shared: CPU timings vary with it).\n\n")
    text += (f"Model {result['model']} ({result['dtype']}), policy full, chunk {result['chunk_size']} tokens. "
             "Time to first token (s) per turn for (a) `model.generate()` on the whole history, (b) `generate()` "
             "with a `DynamicCache` carried by hand, and kvscope's session reuse; ratios are (a)/kvscope and "
             "(b)/kvscope. Each turn generates the check tokens; the reply in the history is (a)'s check tokens then "
             "fixed ids. Same: the check tokens equal (a)'s.\n\n")
    for case in result["cases"]:
        text += (f"### {case['turns']} turns of {case['user_tokens']} user tokens + {case['reply_tokens']}-token "
                 f"replies ({case['check_tokens']} tokens generated per turn)\n\n")
        rows = [_row(r) for r in case["rows"]]
        text += table(rows, [("turn", "turn"), ("prompt_tokens", "prompt tokens"), ("a", "(a) recompute"),
                             ("b", "(b) carried cache"), ("k", "kvscope"), ("ra", "(a)/kvscope"),
                             ("rb", "(b)/kvscope"), ("same", "same as (a): (b) / kvscope")])
        text += "\n" + _idle_line(case["idle_session"]) + "\n\n"
    return text


def _row(r: dict) -> dict:
    return {"turn": r["turn"], "prompt_tokens": r["prompt_tokens"], "a": f"{r['recompute_s']:.3f}",
            "b": f"{r['carried_s']:.3f}", "k": f"{r['kvscope_s']:.3f}",
            "ra": f"{r['recompute_s'] / r['kvscope_s']:.2f}x", "rb": f"{r['carried_s'] / r['kvscope_s']:.2f}x",
            "same": f"{'yes' if r['carried_same'] else 'NO'} / {'yes' if r['kvscope_same'] else 'NO'}"}


def _idle_line(idle: dict) -> str:
    line = f"Idle session of {idle['history_tokens']} tokens, next turn's time to first token: "
    if "swap_in_s" in idle:
        line += (f"after a swap to CPU {idle['swap_ttft_s']:.3f} s (swap-in {idle['swap_in_s']:.3f} s for "
                 f"{idle['kv_bytes']:,} bytes, then {idle['swap_prefilled']} new tokens prefilled), ")
    else:
        line += f"swap not measured ({idle['swap_note']}); "
    return line + f"after a drop {idle['recompute_ttft_s']:.3f} s (recomputes {idle['recomputed_tokens']} tokens)."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", default="900", help="comma-separated: one case per value")
    ap.add_argument("--reply-tokens", type=int, default=100)
    ap.add_argument("--check-tokens", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--data", default=None, help="where the run's JSON goes (default docs/data/multiturn-DEVICE.json)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ as it is")
    ap.add_argument("--render", metavar="JSON", help="only write the section from a saved run")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        write_section(section(result), render(result))
        return 0
    try:
        users = [int(u) for u in args.user_tokens.split(",")]
    except ValueError:
        ap.error(f"--user-tokens takes comma-separated whole numbers, got {args.user_tokens!r}")
    if min(users) < 1 or args.turns < 1 or args.reply_tokens < 0 or args.check_tokens < 1:
        ap.error("--user-tokens, --turns and --check-tokens must be >= 1, --reply-tokens >= 0")
    try:
        model, _, spec = load(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device)
    except UsageError as exc:
        ap.error(str(exc))
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    result = {"meta": run_meta(), "model": spec.name, "device_kind": device.type,
              "dtype": str(next(model.parameters()).dtype), "chunk_size": args.chunk_size, "cpus": os.cpu_count(),
              "cases": []}
    start_load = os.getloadavg()[0]
    warm_up(model, vocab, args)
    for user in users:
        turns = plan_turns(args, spec.max_position_embeddings, user)
        if turns < args.turns:
            print(f"{user} user tokens: {turns} turns fit in {spec.max_position_embeddings} positions "
                  f"(of --turns {args.turns})", flush=True)
        result["cases"].append(run_case(model, vocab, args, user, turns))
    result["load_average"] = [start_load, os.getloadavg()[0]]
    text = render(result)
    print(text)
    if not args.no_write:
        save_json(result, Path(args.data) if args.data else data_path(section(result)))
        write_section(section(result), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
