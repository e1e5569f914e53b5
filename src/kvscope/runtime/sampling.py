"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus), seeded.

    pick = Sampling(temperature=0.7, top_p=0.9, seed=1).picker(device)
    next_ids = pick(logits)        # logits [B, V] -> ids [B]

Greedy (`temperature=0`, the default) is argmax and draws no random numbers. Sampling draws from a generator of its
own, seeded by `seed`, so a seeded generation is reproducible and does not disturb the global RNG. Every step is a
fixed number of tensor ops on fixed shapes (no host synchronisation), so it can run between CUDA graph replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.errors import usage


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. `temperature=0` is greedy; `top_k=0` and `top_p=1` switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 100:
            raise usage(f"temperature must be a number in [0, 100], got {self.temperature!r}",
                        expected="0 for greedy, or e.g. 0.7", fix="temperature")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise usage(f"top_p must be in (0, 1], got {self.top_p!r}", expected="e.g. 0.9, or 1 for no filter",
                        fix="top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise usage(f"top_k must be a whole number >= 0, got {self.top_k!r}", expected="e.g. 50, or 0 for no "
                        "filter", fix="top_k")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise usage(f"seed must be a whole number, got {self.seed!r}", fix="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def picker(self, device) -> Picker:
        return Picker(self, device)


class Picker:
    """The next-token function of one generation (it owns the generation's random generator)."""

    def __init__(self, sampling: Sampling, device):
        self.sampling = sampling
        self.generator = None
        if not sampling.greedy:
            self.generator = torch.Generator(device=device)
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """ids [B] (long) from logits [B, V]."""
        s = self.sampling
        if s.greedy:
            return logits.argmax(-1)
        scores = logits.float() / s.temperature
        if s.top_k and s.top_k < scores.shape[-1]:
            kth = scores.topk(s.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1:
            scores = _top_p(scores, s.top_p)
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities sum to at least `top_p` (the most likely always stays)."""
    ordered, order = scores.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before this token already reaches top_p
    drop[:, 0] = False
    return scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
