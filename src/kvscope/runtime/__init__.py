"""kvscope's runtime: chunked prefill into a preallocated cache, greedy decode, timing and phase callbacks."""

from kvscope.runtime.generate import Generation, generate, positions_from_mask
from kvscope.runtime.sampling import Sampling

__all__ = ["Generation", "Sampling", "generate", "positions_from_mask"]
