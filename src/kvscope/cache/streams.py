"""The second CUDA stream of a device, made once per process: the decode step's side work (kvscope.runtime.step) and
the recall tier's copies (kvscope.cache.recall) run on it."""

from __future__ import annotations

import torch

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device) -> torch.cuda.Stream | None:
    """The second stream of `device` (None on the CPU), made once per process. kvscope's runtime asks for it before
    it allocates the cache: making the first stream sets up CUDA's stream pool, memory outside PyTorch's allocator,
    which a GPU the cache has filled cannot give (H200, int8 KV at 426 x 4112 tokens: `CUDA error: out of memory`
    from `torch.cuda.Stream()` after the prefill, a crash rather than an OOM)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]
