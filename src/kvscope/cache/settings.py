"""What every layer of a `BudgetedCache` shares: the policy, the budget, the sizes, and the one allocation.

The layers hold this object, never the cache itself: a layer pointing back at its container would make every cache a
reference cycle, kept alive (with its GPU memory) until Python's cycle collector happens to run. With no cycle,
`del cache` frees the memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvscope.cache.arena import Arena, Spec, plan_bytes
from kvscope.cache.store import store_layout
from kvscope.policies.base import Policy

QUEUE_MIN = 64  # free-slot queue entries of a non-evicting cache's graph-safe decode (refilled every QUEUE_MIN steps)


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
    graphs: dict = field(default_factory=dict, repr=False)  # captured decode steps (kvscope.runtime.graphs)

    def room(self, first_forward: int) -> int:
        """Slots per row above the budget. An evicting policy needs room for a chunk before it evicts (one chunk, or
        the first forward if shorter); a policy that never evicts needs none: the budget is all it may hold."""
        return min(self.chunk_size, first_forward) if self.policy.evicts else 0

    def queue_length(self, capacity: int, room: int) -> int:
        """Entries of each row's free-slot queue: the eager path's free list holds `room` slots; a non-evicting cache
        (no room) refills a fixed-size queue instead."""
        return min(capacity, room if room else QUEUE_MIN)

    def layer_specs(self, index: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                    first_forward: int) -> list[Spec]:
        room = self.room(first_forward)
        slots = self.budget_tokens + room
        rows = (batch, heads)
        p = f"{index}."
        specs = [(p + "store." + name, shape, dt)
                 for name, shape, dt in store_layout(self.kv_dtype, batch, heads, slots, head_dim, dtype)]
        return specs + [(p + "valid", (*rows, slots), torch.bool), (p + "position", (*rows, slots), torch.long),
                        (p + "score", (*rows, slots), torch.float32), (p + "newest", (*rows, 1), torch.long),
                        (p + "queue", (*rows, self.queue_length(slots, room)), torch.long),
                        (p + "slot_out", (*rows, 1), torch.long)]

    def specs(self, layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
              first_forward: int) -> list[Spec]:
        return [s for i in range(layers) for s in self.layer_specs(i, batch, heads, head_dim, dtype, first_forward)] \
            + [("queue_ptr", (), torch.long)]

    def allocate(self, layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device,
                 first_forward: int) -> Arena:
        """Every layer's storage and slot state in one zeroed allocation (see kvscope.cache.arena)."""
        self.arena = Arena(self.specs(layers, batch, heads, head_dim, dtype, first_forward), device)
        self.queue_ptr = self.arena.views["queue_ptr"]
        return self.arena

    def bytes_for(self, layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                  first_forward: int) -> int:
        return plan_bytes(self.specs(layers, batch, heads, head_dim, dtype, first_forward))
