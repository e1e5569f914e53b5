"""`random`: evict uniformly at random (a baseline every other policy must beat). Seeded, so runs repeat.

The `recent` newest tokens are always kept (default 8), as in knorm: a baseline for what a score adds on top of a
recent window, which every evicting policy here keeps in some form. `recent=0` is uniform over every stored token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvscope.policies.base import ProtectedScores, SlotState


@dataclass
class Random(ProtectedScores):
    name = "random"
    paper = "(baseline)"
    recent: int = 8
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        # One random score per token, drawn when it arrives: the token's fate does not change from step to step.
        if self._generator is None or self._generator.device != state.score.device:
            self._generator = torch.Generator(device=state.score.device).manual_seed(self.seed)
        draw = torch.rand(slots.shape, generator=self._generator, device=state.score.device)
        state.score.scatter_(-1, slots, draw)
