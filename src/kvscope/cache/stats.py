"""Per-layer counters and eviction events of a `BudgetedCache`.

Counters live on the cache's device and are only read (one synchronisation) when someone asks, so monitoring costs
nothing while nobody looks. An optional collector receives one `EvictionEvent` per layer and eviction step; installing
one does cost a synchronisation per event, which is why it is opt-in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch


@dataclass
class LayerStats:
    layer: int
    stored_tokens: int  # most tokens held by any (sequence, KV head) row: what counts against the budget
    stored_entries: int  # (sequence, KV head, token) entries held in all
    capacity_tokens: int  # slots allocated per row (budget + chunk)
    evicted_tokens: int  # evicted entries / KV heads: token-equivalents, summed over the batch
    evictions: int  # eviction steps that dropped something
    bytes: int  # bytes the layer's storage allocated
    evicted_age_mean: float | None  # mean (newest position - evicted position) at eviction
    evicted_position_min: int | None
    evicted_position_max: int | None


@dataclass
class CacheStats:
    layers: list[LayerStats]
    budget_tokens: int
    policy: str
    kv_dtype: str
    seen_tokens: int
    bytes: int = field(init=False)
    evicted_tokens: int = field(init=False)
    stored_tokens: int = field(init=False)

    def __post_init__(self):
        self.bytes = sum(s.bytes for s in self.layers)
        self.evicted_tokens = sum(s.evicted_tokens for s in self.layers)
        self.stored_tokens = max((s.stored_tokens for s in self.layers), default=0)

    def to_dict(self) -> dict:
        return asdict(self) | {"bytes": self.bytes, "evicted_tokens": self.evicted_tokens,
                               "stored_tokens": self.stored_tokens}


@dataclass
class EvictionEvent:
    layer: int
    position: int  # newest position stored when the eviction happened (the "time")
    evicted_entries: int
    evicted_positions: list[int]  # distinct true positions that left at least one KV head


class Collector(Protocol):
    def __call__(self, event: EvictionEvent) -> None: ...


class LayerCounters:
    """Device-side accumulators for one layer; `reset()` for take-and-reset."""

    def __init__(self, device):
        self.device = device
        z = lambda: torch.zeros((), dtype=torch.long, device=self.device)  # noqa: E731
        self.evicted, self.evictions, self.age_sum, self.pos_min, self.pos_max = z(), z(), z(), z(), z()
        self.reset()

    def reset(self) -> None:
        """Zero the counters in place: a captured eviction step keeps recording into the same tensors."""
        with torch.inference_mode():
            for t in (self.evicted, self.evictions, self.age_sum):
                t.zero_()
            self.pos_min.fill_(torch.iinfo(torch.long).max)
            self.pos_max.fill_(-1)

    def record(self, evict: torch.Tensor, position: torch.Tensor, newest: torch.Tensor) -> None:
        n = evict.sum()
        self.evicted += n
        self.evictions += (n > 0).long()
        self.age_sum += torch.where(evict, newest - position, 0).sum()
        big, small = torch.iinfo(torch.long).max, -1
        torch.minimum(self.pos_min, torch.where(evict, position, big).min(), out=self.pos_min)
        torch.maximum(self.pos_max, torch.where(evict, position, small).max(), out=self.pos_max)

    def moved_to(self, device) -> LayerCounters:
        moved = LayerCounters.__new__(LayerCounters)
        moved.device = device
        for name in ("evicted", "evictions", "age_sum", "pos_min", "pos_max"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def read(self) -> tuple[int, int, int, int, int]:
        values = torch.stack([self.evicted, self.evictions, self.age_sum, self.pos_min, self.pos_max]).tolist()
        return tuple(values)
