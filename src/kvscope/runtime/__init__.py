"""kvscope's runtime: chunked prefill into a preallocated cache, greedy decode, timing and phase callbacks."""

from kvscope.runtime.generate import Generation, generate, positions_from_mask

__all__ = ["Generation", "generate", "positions_from_mask"]
