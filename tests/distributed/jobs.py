"""Jobs the tensor-parallel tests run inside each rank (module-level, so spawned ranks can import them)."""

from __future__ import annotations

import torch


def kept_by_policy(ctx, job: dict) -> dict:
    """For each policy: the greedy tokens and the positions each local KV head kept, on this rank's shard."""
    from kvscope.distributed.ranks import kept_positions, load_sharded, memory
    from kvscope.runtime.session import run_prompt

    loaded = load_sharded(ctx, job["model"], random_weights=True, dtype="fp32")
    out = {"rank": ctx.rank, **memory(ctx, loaded.model), "policies": {}}
    for policy, knobs in job["policies"].items():
        r = run_prompt(loaded.model, None, ids=job["ids"], policy=policy, knobs=knobs, budget_tokens=job["budget"],
                       new_tokens=job["new_tokens"], chunk_size=job["chunk_size"], keep_cache=True)
        out["policies"][policy] = {"tokens": r.generation.sequences.tolist(), "kept": kept_positions(r.cache)}
    return out


def fail_on_last_rank(ctx, kind: str) -> None:
    """The last rank fails (`kind`), the others wait in a collective for it: the group must stop, not hang."""
    from kvscope.errors import usage

    if ctx.rank == ctx.world - 1:
        if kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise usage("a bad value on this rank", fix="--budget")
    torch.distributed.all_reduce(torch.ones(1))  # never completes: the last rank does not join
