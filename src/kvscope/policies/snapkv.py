"""`snapkv`: keep what the last `window` queries attend to, pooled over neighbouring positions.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv:2404.14469). The observation
window is the last `window` queries of each prefill chunk (for a one-chunk prompt: the end of the prompt, as in the
paper); their attention is averaged over the window and smoothed with a 1-D pool of `kernel` positions, in position
order. The window itself is always kept. The paper compresses once after prefill; under a hard budget we must also
evict while decoding, so decode steps fold each new query's attention into the score as a moving average over
`window` steps.

The score holds the attention before pooling; the pool runs when the cache evicts (`keep_scores`). The pool is linear
and an observation's slots do not change before the eviction that follows it, so a prompt is scored exactly as the
paper scores it, and a decode step costs a few element-wise ops instead of a sort of every slot by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies._checks import positive_int
from kvscope.policies.base import KEEP, Observation, Policy, SlotState, pool_in_position_order, recent_mask


@dataclass
class SnapKV(Policy):
    name = "snapkv"
    paper = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation, arXiv:2404.14469"
    attention = "window"
    window: int = 32
    kernel: int = 7

    def __post_init__(self):
        positive_int(self.name, "window", self.window)
        positive_int(self.name, "kernel", self.kernel)
        if self.kernel % 2 == 0:
            from kvscope.errors import usage

            raise usage(f"policy 'snapkv': kernel must be odd (a centred pool), got {self.kernel}", fix="kernel")

    def min_budget(self) -> int:
        return self.window + 1

    def describe_minimum(self) -> str:
        return f"the {self.window}-token observation window + 1"

    def observe(self, state: SlotState, obs: Observation) -> None:
        # this block's share of the mean over the observation's rows (a window observed in several blocks sums to the
        # mean over all of them)
        if obs.total_rows == 1:  # a decode step: a moving average over `window` steps (one launch)
            state.score.lerp_(obs.weights[:, :, 0], 1.0 / self.window)
            return
        share = obs.weights.sum(dim=2) / obs.total_rows
        if obs.first:  # a prefill chunk's window
            state.score.copy_(share)
        else:
            state.score.add_(share)

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        pooled = pool_in_position_order(state.score, state, self.kernel)
        return pooled.masked_fill(recent_mask(state, self.window), KEEP)
