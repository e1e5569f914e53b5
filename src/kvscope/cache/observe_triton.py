"""lru's decode-step update in one launch per layer (imported only on CUDA with Triton).

A slot is used by the newest query when its weight is above the threshold or among the query's top k (at or above
the k-th largest weight, ties at it counting too); a used slot's score becomes the query's position. The k-th largest
weight comes from the kernels themselves, not from `torch.topk` (a radix select and a sort; replacing them took lru
from 0.773 to 0.826 of a full cache's decode speed on the H200, budget 2048).

- `_lru_row` (rows up to ROW_MAX slots, a decode at a budget below ROW_MAX): grid (B * H,), one program holds its
  whole row. When k weights are above the threshold already, the top k adds nothing (its k-th largest is above the
  threshold too) and the program skips the search; otherwise it takes the k-th largest in k passes, each taking the
  largest and removing one copy of it: one max reduction over int64 keys that hold the value and the lane.
- Longer rows, two launches: `_lru_candidates`, grid (B * H, tiles of CANDIDATE_BLOCK slots), takes each tile's k
  largest the same way into a scratch row; `_lru_update`, grid (B * H, tiles of UPDATE_BLOCK slots), takes the k-th
  largest of its row's candidates (a row's k largest are among its tiles' k largest), then updates its tile.

Warps of the two-launch path, from two H200 profiles of a 2k-budget decode (32 layers; 2,560 slots read in the first,
2,049 in the second): the candidates kernel runs one warp per program (its passes are chains of small reductions,
which one warp does with shuffles alone): 92 us a step with two warps, 72 with one; the update keeps four: 189 us a
step with four, 378 with one. Weights past the observed width count as 0 (the width a padded copy would have to the
capacity); a removed weight becomes -2, below any weight, so it is never taken before one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.cache.quant_triton import _jit

CANDIDATE_BLOCK = 256
UPDATE_BLOCK = 1024
REMOVED = tl.constexpr(-(1 << 62))  # its high 32 bits are the fp32 bits of -2.0
ROW_MAX = 8192  # the longest row one program holds (32 values a thread at 8 warps)


@triton.jit
def _keyed(x, lanes, width: tl.constexpr):
    """Int64 keys of `x` (fp32, lanes past a row at -1) in the order of their values, equal values by lane (lower
    first): each key is unique, so one max reduction takes the largest value and one copy of it."""
    return (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (width - 1 - lanes).to(tl.int64)


@triton.jit
def _take_largest(keys):
    """(the largest value of `keys`, `keys` with that one removed: it becomes a key whose value is -2.0)."""
    top = tl.max(keys, 0)
    return (top >> 32).to(tl.int32).to(tl.float32, bitcast=True), tl.where(keys == top, REMOVED, keys)


@triton.jit
def _mark_used(score_ptr, valid_ptr, pos_ptr, bh, heads, slots, s, m, used):
    """Scores of the slots `s` (mask `m`) of row `bh`: a used, valid slot's becomes the query's position."""
    used = used & tl.load(valid_ptr + bh * slots + s, mask=m, other=0).to(tl.int1)
    when = tl.load(pos_ptr + bh // heads).to(tl.float32)
    old = tl.load(score_ptr + bh * slots + s, mask=m, other=0.0)
    tl.store(score_ptr + bh * slots + s, tl.where(used, tl.maximum(old, when), old), mask=m)


@_jit("width", "heads", "slots")
def _lru_row(score_ptr, w_ptr, valid_ptr, pos_ptr, width, heads, slots, threshold, K: tl.constexpr,
             BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK)
    m = s < width  # past the width a weight is 0: never used, its score unchanged
    w = tl.load(w_ptr + bh * width + s, mask=m, other=0.0)
    used = w > threshold
    if tl.sum(used.to(tl.int32), 0) < K:
        keys = _keyed(tl.where(m, w, -1.0), s, BLOCK)
        for _ in tl.static_range(K):
            kth, keys = _take_largest(keys)
        used = used | ((w >= kth) & (w > 0.0))
    _mark_used(score_ptr, valid_ptr, pos_ptr, bh, heads, slots, s, m, used)


@_jit("width")
def _lru_candidates(w_ptr, out_ptr, width, K: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    s = tile * BLOCK + lanes
    keys = _keyed(tl.load(w_ptr + bh * width + s, mask=s < width, other=-1.0), lanes, BLOCK)
    base = out_ptr + (bh * tl.num_programs(1) + tile) * K
    for i in tl.static_range(K):
        top, keys = _take_largest(keys)
        tl.store(base + i, top)


@_jit("width", "slots", "tiles", "heads")
def _lru_update(score_ptr, w_ptr, cand_ptr, valid_ptr, pos_ptr, width, slots, tiles, heads, threshold,
                K: tl.constexpr, CANDIDATES: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CANDIDATES)
    keys = _keyed(tl.load(cand_ptr + bh * tiles * K + c, mask=c < tiles * K, other=-1.0), c, CANDIDATES)
    for _ in tl.static_range(K):
        kth, keys = _take_largest(keys)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = s < slots
    w = tl.load(w_ptr + bh * width + s, mask=s < width, other=0.0)
    _mark_used(score_ptr, valid_ptr, pos_ptr, bh, heads, slots, s, m, (w > threshold) | ((w >= kth) & (w > 0.0)))


def lru_decode(score: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
               threshold: float, top_k: int) -> None:
    """`score` [B, H, S] fp32 updated in place from `weights` [B, H, W] fp32 (W <= S, contiguous rows), `valid`
    [B, H, S] bool and `positions` [B] (the query's: often a strided column of [B, n] positions, or an expanded
    scalar, so made contiguous: the kernel reads them as one row)."""
    positions = positions.contiguous()
    b, h, slots = score.shape
    width = weights.shape[-1]
    k = min(top_k, slots)
    if width <= ROW_MAX:
        block = triton.next_power_of_2(width)
        _lru_row[(b * h,)](score, weights, valid.view(torch.uint8), positions, width, h, slots, threshold, K=k,
                           BLOCK=block, num_warps=max(1, min(8, block // 512)))
        return
    tiles = triton.cdiv(width, CANDIDATE_BLOCK)
    candidates = torch.empty(b * h, tiles, k, dtype=torch.float32, device=score.device)
    _lru_candidates[(b * h, tiles)](weights, candidates, width, K=k, BLOCK=CANDIDATE_BLOCK, num_warps=1)
    _lru_update[(b * h, triton.cdiv(slots, UPDATE_BLOCK))](
        score, weights, candidates, valid.view(torch.uint8), positions, width, slots, tiles, h, threshold, K=k,
        CANDIDATES=triton.next_power_of_2(tiles * k), BLOCK=UPDATE_BLOCK, num_warps=4)
