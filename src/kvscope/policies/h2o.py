"""`h2o`: heavy hitters (largest accumulated attention) plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(arXiv:2306.14048). `recent_ratio` of the budget is reserved for the newest tokens (the paper splits the budget half
and half); the rest keeps the tokens with the highest attention summed over every query seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies._checks import fraction
from kvscope.policies.base import KEEP, Observation, Policy, SlotState, recent_mask


@dataclass
class H2O(Policy):
    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle, arXiv:2306.14048"
    attention = "all"
    recent_ratio: float = 0.5

    def __post_init__(self):
        fraction(self.name, "recent_ratio", self.recent_ratio)

    def observe(self, state: SlotState, obs: Observation) -> None:
        w = obs.weights
        state.score.add_(w[:, :, 0] if w.shape[2] == 1 else w.sum(dim=2))  # one launch for a decode step

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        recent = int(budget * self.recent_ratio)
        return state.score.masked_fill(recent_mask(state, recent), KEEP)
