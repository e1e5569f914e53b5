"""What every layer of a `BudgetedCache` shares: the policy, the budget, the sizes, and the one allocation.

The layers hold this object, never the cache itself: a layer pointing back at its container would make every cache a
reference cycle, kept alive (with its GPU memory) until Python's cycle collector happens to run. With no cycle,
`del cache` frees the memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvscope.cache.arena import TYPE_NAMES, Arena
from kvscope.kvformats import Layout, cache_layout, layout_bytes
from kvscope.policies.base import Policy


@dataclass
class CacheSettings:
    policy: Policy
    budget_tokens: int
    kv_dtype: str | None
    chunk_size: int
    evict_batch: int
    collector: object = None
    offloader: object = None
    budget_bytes: int | None = None
    last_seen_attention: str | None = None
    arena: Arena | None = field(default=None, repr=False)
    queue_ptr: torch.Tensor | None = field(default=None, repr=False)  # device scalar: next queue entry to take
    recall: str | None = None  # "cpu": prefill evictions wait in CPU memory for the question (kvscope.cache.recall)
    recall_state: str | None = None  # while kvscope's runtime prefills: "record", then "final" for the last forward
    recall_capacity: int = 0  # tokens per row the tier may have to hold (the prompt's)
    moves: object = field(default=None, repr=False)  # while recording: evictions on their way to the tiers (tier.Moves)
    version: int = 0  # +1 at every new allocation: what was captured over an older one is stale
    fresh: bool = False  # allocated (zeroed) and not used yet

    def room(self, first_forward: int) -> int:
        """Slots per row above the budget. An evicting policy needs room for a chunk before it evicts (one chunk, or
        the first forward if shorter); a policy that never evicts needs none: the budget is all it may hold."""
        return min(self.chunk_size, first_forward) if self.policy.evicts else 0

    def specs(self, layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
              first_forward: int) -> Layout:
        dense = TYPE_NAMES[dtype]
        return cache_layout(layers, batch, heads, head_dim, self.kv_dtype or dense, dense, self.budget_tokens,
                            self.room(first_forward))

    def allocate(self, layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device,
                 first_forward: int) -> Arena:
        """Every layer's storage and slot state in one zeroed allocation (see kvscope.cache.arena). A cache reset and
        used again with the same shapes keeps its allocation (zeroed again), so what was captured over it stays
        valid."""
        specs = self.specs(layers, batch, heads, head_dim, dtype, first_forward)
        if self.arena is not None and self.arena.specs == specs and self.arena.buffer.device == torch.device(device):
            if not self.fresh:
                self.arena.buffer.zero_()
            self.fresh = False
            return self.arena
        self.arena = None  # the old one goes before the new one is made
        self.arena = Arena(specs, device)
        self.queue_ptr = self.arena.views["queue_ptr"]
        self.version += 1
        self.fresh = False
        return self.arena

    def bytes_for(self, layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                  first_forward: int) -> int:
        return layout_bytes(self.specs(layers, batch, heads, head_dim, dtype, first_forward))
