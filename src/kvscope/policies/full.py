"""`full`: no eviction. The budget is a hard cap: a sequence that outgrows it is an error, never a silent drop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies.base import KEEP, Policy, SlotState


@dataclass
class Full(Policy):
    name = "full"
    paper = "(baseline: the default, unbounded cache)"
    evicts = False

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Nothing to score: a cache that never evicts never reads a score (one launch less per layer and step)."""

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        return torch.full_like(state.score, KEEP)
