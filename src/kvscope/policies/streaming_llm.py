"""`streaming_llm`: attention sinks (the first `sink_tokens` positions) plus the most recent tokens.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv:2309.17453). Unlike the paper we
do not re-rotate kept keys to new contiguous positions: every key keeps its true RoPE position (see docs/cache.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies.base import ProtectedScores, SlotState


@dataclass
class StreamingLLM(ProtectedScores):
    name = "streaming_llm"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453"
    KNOB = "sink_tokens"
    MINIMUM = "{n} sink tokens + at least 1 recent token"
    sink_tokens: int = 4

    def protected(self, state: SlotState) -> torch.Tensor:
        return state.position < self.sink_tokens

    def scores(self, state: SlotState) -> torch.Tensor:
        return state.position.to(torch.float32)  # the newest go last: a recent window fills the rest of the budget
