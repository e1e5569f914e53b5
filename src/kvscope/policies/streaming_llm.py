"""`streaming_llm`: attention sinks (the first `sink_tokens` positions) plus the most recent tokens.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv:2309.17453). Unlike the paper we
do not re-rotate kept keys to new contiguous positions: every key keeps its true RoPE position (see docs/cache.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies._checks import non_negative_int
from kvscope.policies.base import KEEP, Policy, SlotState
from kvscope.policies.registry import register


@register
@dataclass
class StreamingLLM(Policy):
    name = "streaming_llm"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453"
    sink_tokens: int = 4

    def __post_init__(self):
        non_negative_int(self.name, "sink_tokens", self.sink_tokens)

    def min_budget(self) -> int:
        return self.sink_tokens + 1

    def describe_minimum(self) -> str:
        return f"{self.sink_tokens} sink tokens + at least 1 recent token"

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        scores = state.position.to(torch.float32)
        return scores.masked_fill(state.position < self.sink_tokens, KEEP)
