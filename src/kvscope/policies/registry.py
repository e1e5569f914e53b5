"""The policy registry: `available()`, `get(name, **knobs)`; one policy per module.

A policy registers itself when its class is defined (`Policy.__init_subclass__`); this module only imports the policy
modules, so the imports run one way: registry -> policies -> base.
"""

from __future__ import annotations

import dataclasses

from kvscope.errors import usage
from kvscope.policies import (  # noqa: F401 - importing a policy module registers it; this order is `available()`'s
    full,
    h2o,
    knorm,
    lru,
    random,
    sliding_window,
    snapkv,
    streaming_llm,
    tova,
)
from kvscope.policies.base import REGISTRY, Policy


def available() -> list[str]:
    return list(REGISTRY)


def policy_class(name: str) -> type[Policy]:
    if name not in REGISTRY:
        raise usage(f"unknown policy {name!r}", expected="one of " + ", ".join(REGISTRY), fix="--policy")
    return REGISTRY[name]


def knobs(name: str) -> dict[str, object]:
    """The typed knobs of a policy and their defaults (what `get(name, **knobs)` accepts)."""
    return {f.name: f.default for f in dataclasses.fields(policy_class(name)) if f.name != "seed"}


def get(policy: str | Policy, **kwargs) -> Policy:
    """A policy instance from a name and knobs, or the instance itself. Unknown knobs are a `UsageError`."""
    if isinstance(policy, Policy):
        if kwargs:
            raise usage("knobs were given together with a policy instance", fix="pass a name or drop the knobs")
        return policy
    cls = policy_class(policy)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise usage(f"policy {policy!r} has no knob {', '.join(unknown)}",
                    expected="one of " + (", ".join(sorted(allowed - {"seed"})) or "(no knobs)"))
    return cls(**kwargs)


# Best quality first (docs/benchmarks.md, quality-2k-30): snapkv and lru tie at 12.5% and 25%; below snapkv's minimum
# (its 32-token window + 1) lru is far ahead (14/30 at 2.5% of 2k, where h2o, streaming and sliding score 0/30).
# snapkv stays first: its prefill observes 32 queries per chunk, lru's every query (3.3 vs 1.7 s at 8k on an H200).
PREFERRED_EVICTION = ("snapkv", "lru", "h2o", "streaming_llm", "sliding_window")


def preferred_for(budget: int) -> str:
    """The preferred evicting policy (default knobs) whose fixed part fits in `budget` tokens."""
    return next(p for p in PREFERRED_EVICTION if budget >= get(p).min_budget())

