"""`tova`: Token Omission Via Attention - evict the token the newest query attends to least.

Oren et al. 2024, "Transformers are Multi-State RNNs" (arXiv:2401.06104). As in the paper the score is the newest
query's attention averaged over all heads of the layer, so a layer evicts the same tokens in every KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies.base import Observation, Policy, SlotState


@dataclass
class TOVA(Policy):
    name = "tova"
    paper = "Oren et al. 2024, Transformers are Multi-State RNNs, arXiv:2401.06104"
    attention = "last"

    def observe(self, state: SlotState, obs: Observation) -> None:
        last = obs.weights[:, :, -1, :].mean(dim=1, keepdim=True)  # [B, 1, S]
        state.score.copy_(last.expand_as(state.score))

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        return state.score
