"""`knorm`: keep the keys with the lowest L2 norm (low-norm keys draw high attention).

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (arXiv:2406.11430);
kvpress calls it KnormPress. Needs no attention scores at all. The `recent` newest tokens are always kept (default 8):
the end of a prompt (the question, the start of the answer) is what the next tokens read first, and the paper's
scoring, blind to position, can drop it; a recent window is the usual companion of a score-based policy (H2O, SnapKV's
observation window, StreamingLLM's recent tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.policies.base import ProtectedScores, SlotState


@dataclass
class KNorm(ProtectedScores):
    name = "knorm"
    paper = ("Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, "
             "arXiv:2406.11430")
    recent: int = 8

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        state.score.scatter_(-1, slots, -keys.float().norm(dim=-1))
