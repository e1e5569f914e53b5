"""The recall's first pass fused (Triton): every row of the prompt's last forward attends one span of resident or
waiting tokens, and the span's share is merged into the running output, without materializing the logits.

Why: the first pass (kvscope.cache.recall._question) gives every row of the last forward (g x 512 rows a KV head for
Llama 3 at 512-token chunks) the attention output over the whole prompt. In PyTorch ops that is fp32 logits
[B, H, rows, span] per span, a dozen passes over them, and spans small enough for those logits to fit in SPAN_BYTES:
on the H200 at 32k (the 8B shape) about 50 spans a layer and a prefill 1.23x the one without the tier, where the
question's 32 rows alone had cost 1.03x. Here one launch a span keeps an online softmax (max, sum, weighted values)
in registers, flash-attention style, and rescales the spans before it in place: a span's memory is its keys and
values, so spans are large and few.

Keys and values are used in their own dtype (the query is cast to it, as the fused decode attention does), with fp32
accumulation; an fp32 store takes full-precision products (kvscope.cache.attention_triton._dot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.cache.attention_triton import _dot
from kvscope.cache.quant_triton import _jit

BLOCK_M, BLOCK_N = 64, 64  # rows and slots per tile
_ARGS = ("rows", "slots", "heads", "qsb", "qsh", "qsr", "ksb", "ksh", "kss", "vsb", "vsh", "vss", "msb", "msh",
         "mss")


@_jit(*_ARGS)
def _kvscope_recall_span(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, lse_ptr, rows, slots, heads, scale,
                         qsb, qsh, qsr, ksb, ksh, kss, vsb, vsh, vss, msb, msh, mss,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: bh * rows * D passes 2**31 at a large batch
    b = bh // heads
    h = bh % heads
    m = pid * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    row_ok = m < rows
    q = tl.load(q_ptr + b * qsb + h * qsh + m[:, None] * qsr + d[None, :], mask=row_ok[:, None], other=0.0)
    top = tl.full([BM], float("-inf"), tl.float32)
    total = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in range(0, slots, BN):
        n = start + tl.arange(0, BN)
        n_ok = n < slots
        k = tl.load(k_ptr + b * ksb + h * ksh + n[None, :] * kss + d[:, None], mask=n_ok[None, :], other=0.0)
        seen = tl.load(valid_ptr + b * msb + h * msh + n * mss, mask=n_ok, other=0) != 0
        s = tl.where(seen[None, :], _dot(q, k) * scale, float("-inf"))
        grown = tl.maximum(top, tl.max(s, 1))
        ref = tl.where(grown == float("-inf"), 0.0, grown)  # a row that has seen nothing: exps of 0, not nan
        p = tl.exp(s - ref[:, None])
        alpha = tl.exp(top - ref)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * vsb + h * vsh + n[:, None] * vss + d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        top = grown
    ref = tl.where(top == float("-inf"), 0.0, top)  # acc and total are relative to exp(ref)
    span_lse = tl.where(total > 0, ref + tl.log(total), float("-inf"))
    lse_at = lse_ptr + bh * rows + m
    old_lse = tl.load(lse_at, mask=row_ok, other=float("-inf"))
    big = tl.maximum(old_lse, span_lse)
    big = tl.where(big == float("-inf"), 0.0, big)
    new_lse = big + tl.log(tl.exp(old_lse - big) + tl.exp(span_lse - big))  # -inf where neither has seen a token
    safe = tl.where(new_lse == float("-inf"), 0.0, new_lse)
    out_at = out_ptr + bh * rows * D + m[:, None] * D + d[None, :]
    old = tl.load(out_at, mask=row_ok[:, None], other=0.0)
    # a span whose rows saw nothing (total 0) adds nothing: exp(ref - safe) alone may overflow where lse < -88
    mine = tl.where(total > 0, tl.exp(ref - safe), 0.0)
    new = old * tl.exp(old_lse - safe)[:, None] + acc * mine[:, None]
    tl.store(out_at, new, mask=row_ok[:, None])
    tl.store(lse_at, new_lse, mask=row_ok)


def add_span(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Adds the share of one span (`keys`, `values` [B, H, s, D], `valid` [B, H, s]) to the running softmax output
    `out` [B, H, r, D] and log-sum-exp `lse` [B, H, r, 1] (fp32, contiguous; -inf where a row has seen nothing yet) of
    the rows `query` [B, H, r, D] (unscaled; cast to the keys' dtype), in place. Returns `lse`."""
    b, h, r, d = query.shape
    s = keys.shape[2]
    if not (out.is_contiguous() and lse.is_contiguous() and out.dtype == lse.dtype == torch.float32):
        raise ValueError("add_span: out and lse must be contiguous fp32")
    query = query.to(keys.dtype)
    keys, values, query = (t if t.stride(-1) == 1 else t.contiguous() for t in (keys, values, query))
    valid = valid.view(torch.uint8)
    if s:
        _kvscope_recall_span[(triton.cdiv(r, BLOCK_M), b * h)](
            query, keys, values, valid, out, lse, r, s, h, scaling,
            *query.stride()[:3], *keys.stride()[:3], *values.stride()[:3], *valid.stride(),
            D=d, BM=BLOCK_M, BN=BLOCK_N)
    return lse
