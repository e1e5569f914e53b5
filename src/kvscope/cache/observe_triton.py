"""One launch for an attention-reading policy's decode-step update (imported only on CUDA with Triton).

`lru_decode`: a slot is used by the newest query when its weight is above the threshold or among the query's top k
(at or above the k-th largest weight, which a `topk` gives); a used slot's score becomes the query's position."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lru_decode(score_ptr, w_ptr, kth_ptr, valid_ptr, pos_ptr, slots, heads, threshold, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = s < slots
    w = tl.load(w_ptr + bh * slots + s, mask=m, other=0.0)
    kth = tl.load(kth_ptr + bh)
    valid = tl.load(valid_ptr + bh * slots + s, mask=m, other=0).to(tl.int1)
    used = ((w > threshold) | ((w >= kth) & (w > 0.0))) & valid
    when = tl.load(pos_ptr + bh // heads).to(tl.float32)
    old = tl.load(score_ptr + bh * slots + s, mask=m, other=0.0)
    tl.store(score_ptr + bh * slots + s, tl.where(used, tl.maximum(old, when), old), mask=m)


def lru_decode(score: torch.Tensor, weights: torch.Tensor, kth: torch.Tensor, valid: torch.Tensor,
               positions: torch.Tensor, threshold: float) -> None:
    b, h, s = score.shape
    block = 1024
    _lru_decode[(b * h, triton.cdiv(s, block))](score, weights, kth.contiguous(), valid.view(torch.uint8), positions,
                                                s, h, threshold, BLOCK=block, num_warps=4)
