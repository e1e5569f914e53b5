"""`lru`: least recently used, where "used" means attended.

A token is used by a query when it receives attention weight above `threshold` or is among that query's `top_k`
slots (mean attention over the query heads of its KV head). Its score is the position of the last query that used
it (a new token counts as used on arrival); the least recently used tokens go first. This is the eviction strategy
the seed articles name; the attention-based notion of "use" follows the recency heuristics of Zhang et al. 2023 (H2O)
and is the one vLLM-style block LRU cannot express, since blocks there are evicted whole.

`spread`: when the cache evicts, a token counts as used as recently as any of its `spread // 2` stored neighbours on
either side (a max-pool of the last-use positions over `spread` neighbouring positions). Attention lands on one or
two tokens of a phrase (of a number, one digit), and a phrase with its other tokens evicted is lost; pooling scores
over neighbouring positions to keep such clusters whole is SnapKV's clustering step (Li et al. 2024,
arXiv:2404.14469; its reference code offers a max-pool besides the average). `spread=1` is plain LRU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.errors import usage
from kvscope.policies._checks import fraction, non_negative_int, positive_int
from kvscope.policies.base import Observation, Policy, SlotState, pool_in_position_order, widen

FUSED_TOP_K = 16  # the fused update unrolls one pass per top-k slot: a larger top_k runs as PyTorch ops


@dataclass
class LRU(Policy):
    name = "lru"
    paper = ("least-recently-used caching; 'use' = attention above a threshold or in the top-k of a step; "
             "neighbour pooling from Li et al. 2024, SnapKV, arXiv:2404.14469")
    attention = "all"
    insert_score = "position"
    narrow_decode_weights = True  # the fused update reads past the weights' width as 0; the PyTorch one pads
    threshold: float = 0.01
    top_k: int = 8
    spread: int = 7

    def __post_init__(self):
        fraction(self.name, "threshold", self.threshold)
        non_negative_int(self.name, "top_k", self.top_k)
        positive_int(self.name, "spread", self.spread)
        if self.spread % 2 == 0:
            raise usage(f"policy 'lru': spread must be odd (a centred pool), got {self.spread}", fix="spread")

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        state.score.scatter_(-1, slots, state.position.gather(-1, slots).to(torch.float32))

    def observe(self, state: SlotState, obs: Observation) -> None:
        if obs.weights.shape[2] == 1 and self.top_k:
            return self._observe_one(state, obs)
        w = widen(obs.weights, state.score.shape[-1])  # [B, H, Q, S]
        used = w > self.threshold
        k = min(self.top_k, w.shape[-1])
        if k:
            top = w.topk(k, dim=-1).indices
            used = used | torch.zeros_like(used).scatter(-1, top, True)
        used = used & state.valid[:, :, None, :]
        when = obs.query_position.to(torch.float32)[:, None, :, None]  # [B, 1, Q, 1]
        last = torch.where(used, when, -1.0).amax(dim=2)  # a scalar, not a host tensor: graph-capturable
        torch.maximum(state.score, last, out=state.score)

    def _observe_one(self, state: SlotState, obs: Observation) -> None:
        """A decode step's query: "in the top k" is "at or above the k-th largest weight" (ties at it count too), so
        on CUDA the update is fused launches that find that weight themselves (kvscope.cache.observe_triton)
        instead of a `topk` and a dozen ops."""
        from kvscope.cache import fused

        w = obs.weights[:, :, 0]  # [B, H, S]
        position = obs.query_position[:, 0]  # [B]
        if self.top_k <= FUSED_TOP_K and w.is_contiguous() and fused.run(
                state.score, "observe_triton.lru_decode", state.score, w, state.valid, position, self.threshold,
                self.top_k)[0]:
            return
        w = widen(w, state.score.shape[-1])
        kth = w.topk(min(self.top_k, w.shape[-1]), dim=-1).values[..., -1]  # [B, H]
        used = ((w > self.threshold) | ((w >= kth[..., None]) & (w > 0))) & state.valid
        when = position.to(torch.float32)[:, None, None]
        torch.maximum(state.score, torch.where(used, when, -1.0), out=state.score)

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        if self.spread == 1:
            return state.score
        return pool_in_position_order(state.score, state, self.spread, mode="max")
