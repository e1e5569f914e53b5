"""`sliding_window`: keep the most recent `budget` tokens (what Mistral-style local attention keeps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies.base import Policy, SlotState


@dataclass
class SlidingWindow(Policy):
    name = "sliding_window"
    paper = "Beltagy et al. 2020, Longformer (local attention window)"

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        return state.position.to(torch.float32)
