"""`random`: evict uniformly at random (a baseline every other policy must beat). Seeded, so runs repeat."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvscope.policies.base import Policy, SlotState
from kvscope.policies.registry import register


@register
@dataclass
class Random(Policy):
    name = "random"
    paper = "(baseline)"
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        # One random score per token, drawn when it arrives: the token's fate does not change from step to step.
        if self._generator is None or self._generator.device != state.score.device:
            self._generator = torch.Generator(device=state.score.device).manual_seed(self.seed)
        draw = torch.rand(slots.shape, generator=self._generator, device=state.score.device)
        state.score.scatter_(-1, slots, draw)

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        return state.score
