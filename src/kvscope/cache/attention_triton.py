"""Fused decode attention (Triton): one new query per row against every store format, without a dense copy.

Why: at decode, the unfused path of `BudgetedLayer` reads the whole cache into a dense [2, B, H, slots, D] tensor
(dequantizing it for fp8/int8/int4), builds a boolean mask [B, H, 1, slots] from the slot state with a handful of
PyTorch ops, expands it per query head and runs sdpa: 10 to 15 launches per layer, and for a quantized store a
dequantized copy of the whole cache written and read back every step. Here the same attention is two launches:

1. `_kvscope_decode_split`: grid (splits, B * Hkv). Each program takes SPLIT slots (see TUNING) of one (sequence, KV
   head) row, dequantizes them tile by tile in registers (the same tile loaders as the store's read kernels, so the
   numbers are the same), scores all query heads of the GQA group at once (tl.dot, fp32 accumulation), masks slots
   that are not valid, and keeps an online softmax (max, sum, weighted values). Splitting over slots keeps the GPU
   busy at batch 1.
2. `_kvscope_decode_combine`: grid (B * Hq,): merges one query head's partial results (log-sum-exp rescaling).

Visibility is exactly the unfused mask for a one-token chunk: every valid slot, plus the query's own slot (which a
padding token has not made valid). Used for every one-token forward (`BudgetedLayer._decode`). For a policy that reads
attention (h2o, lru, snapkv, tova), the split kernel also writes its masked logits and the merge writes each query
head's log-sum-exp, so the softmax weights the policy observes come from the same pass over the keys.

Keys and values are cast to the query dtype before the products, as the unfused path does (it dequantizes to the
compute dtype and runs sdpa), so results agree to bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.cache.quant_triton import _jit, int4_tile, pertoken_tile
from kvscope.kvformats import INT4_GROUP, INT4_RESIDUAL

COMBINE_BLOCK = 64  # splits merged at once by the second kernel
PROGRAMS_PER_SM = 4  # split-kernel programs per multiprocessor that long contexts are divided into
MAX_SPLIT = 2048  # slots per program at most
WEIGHTS_BLOCK = 256  # slots per program of the observed-weights kernel
DENSE, FP8, INT8, INT4 = 0, 1, 2, 3
# Per format: slots per program of the first kernel (SPLIT, a multiple of BLOCK_N), slots per tile, warps. Chosen from
# benchmarks/decode_kernel.py on an H100 (docs/benchmarks.md, section decode-kernel): 4 warps suit bf16, but make the
# int8 kernel spill (10x slower); int4's heavier unpacking does best on small tiles.
TUNING = {DENSE: {"SPLIT": 64, "BLOCK_N": 64, "NUM_WARPS": 4}, FP8: {"SPLIT": 64, "BLOCK_N": 64, "NUM_WARPS": 2},
          INT8: {"SPLIT": 64, "BLOCK_N": 64, "NUM_WARPS": 2}, INT4: {"SPLIT": 32, "BLOCK_N": 32, "NUM_WARPS": 2}}
LOG2E = 1.4426950408889634


@triton.jit
def _tile(kv, b, h, s, rows, d, m, a0, a1, a2, a3, a4, full, st, KIND: tl.constexpr, GROUP: tl.constexpr,
          R: tl.constexpr):
    """fp32 [BLOCK_N, D] keys (kv 0) or values (kv 1) of slots `s`, whatever the store's format.

    a0..a4 are the store's tensors and `st` a pointer to its strides (int64 on the device: 16 of them), so one kernel
    signature serves every format."""
    if KIND == 0:
        if kv == 0:  # noqa: SIM108 - Triton needs a statement here, not a conditional expression
            base = a0
        else:
            base = a1
        x = tl.load(base + b * tl.load(st) + h * tl.load(st + 1) + s[:, None] * tl.load(st + 2) + d[None, :],
                    mask=m, other=0.0).to(tl.float32)
    elif KIND == 3:
        x = int4_tile(a0, a1, a2, a3, a4, kv, b, h, s, rows, d, m, full,
                      tl.load(st), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3),
                      tl.load(st + 4), tl.load(st + 5), tl.load(st + 6), tl.load(st + 7),
                      tl.load(st + 8), tl.load(st + 9), tl.load(st + 10), tl.load(st + 11),
                      tl.load(st + 12), tl.load(st + 13), tl.load(st + 14), tl.load(st + 15),
                      tl.load(st + 16), tl.load(st + 17), tl.load(st + 18), tl.load(st + 19), GROUP, R)
    else:
        x = pertoken_tile(a0, a1, kv, b, h, s, rows, d, m, tl.load(st), tl.load(st + 1), tl.load(st + 2),
                          tl.load(st + 3), tl.load(st + 4), tl.load(st + 5), tl.load(st + 6), tl.load(st + 7),
                          KIND == 1)
    return x


# own_ptr too: after an eviction the own-slot view starts anywhere, and its alignment must not cause a recompile
@triton.jit
def _dot(a, b):
    """tl.dot in full fp32 for fp32 inputs (Triton's default would be TF32, less precise than the unfused path)."""
    if a.dtype == tl.float32:  # noqa: SIM108 - a compile-time branch: each variant compiles one tl.dot
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


_SPLIT_ARGS = ("own_ptr", "score_ptr", "upto", "splits", "heads", "group", "full", "qsb", "qsh", "vsb", "vsh", "osb",
               "osh", "ssr")


@_jit(*_SPLIT_ARGS)
def _kvscope_decode_split(q_ptr, valid_ptr, own_ptr, a0, a1, a2, a3, a4, st, part_ptr, stat_ptr, score_ptr,
                          upto, splits, heads, group, full, qk_scale, qsb, qsh, vsb, vsh, osb, osh, ssr,
                          D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                          KIND: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr, SCORES: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    gm = g < group
    q = tl.load(q_ptr + b * qsb + (h * group + g)[:, None] * qsh + d[None, :], mask=gm[:, None], other=0.0)
    dtype = q.dtype
    own = tl.load(own_ptr + b * osb + h * osh)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, upto)
    # a split with no visible slot (the unwritten tail of a cache, a fully evicted range) loads no key or value
    span = lo + tl.arange(0, SPLIT)
    inside = span < hi
    vis = tl.load(valid_ptr + b * vsb + h * vsh + span, mask=inside, other=0).to(tl.int1) | (span == own)
    if tl.max((vis & inside).to(tl.int32), axis=0) > 0:
        for start in range(lo, hi, BLOCK_N):
            s = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
            rows = s < hi
            m = rows[:, None] & (d < D)[None, :]
            valid = tl.load(valid_ptr + b * vsb + h * vsh + s, mask=rows, other=0).to(tl.int1)
            seen = rows & (valid | (s == own))
            k = _tile(0, b, h, s, rows, d, m, a0, a1, a2, a3, a4, full, st, KIND, GROUP, R).to(dtype)
            qk = _dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
            qk = tl.where(seen[None, :], qk, float("-inf"))
            if SCORES:  # the logits (log2 units) of every query head, for a policy that reads attention
                tl.store(score_ptr + (bh * group + g)[:, None] * ssr + s[None, :], qk,
                         mask=gm[:, None] & rows[None, :])
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no NaN
            p = tl.exp2(qk - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            v = _tile(1, b, h, s, rows, d, m, a0, a1, a2, a3, a4, full, st, KIND, GROUP, R).to(dtype)
            acc = acc * alpha[:, None] + _dot(p.to(dtype), v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
    elif SCORES:
        for start in range(lo, hi, BLOCK_N):
            s = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
            tl.store(score_ptr + (bh * group + g)[:, None] * ssr + s[None, :],
                     tl.full((BLOCK_G, BLOCK_N), float("-inf"), tl.float32), mask=gm[:, None] & (s < hi)[None, :])
    row = (bh * splits + split) * group + g  # only the group's real query heads are kept
    tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None])
    tl.store(stat_ptr + row * 2, m_i, mask=gm)
    tl.store(stat_ptr + row * 2 + 1, l_i, mask=gm)


@_jit("splits", "heads", "group", "qheads", "osb", "osh")
def _kvscope_decode_combine(part_ptr, stat_ptr, out_ptr, lse_ptr, splits, heads, group, qheads, osb, osh,
                            D: tl.constexpr, BLOCK_S: tl.constexpr, SCORES: tl.constexpr):
    """One query head per program: merges its `splits` partial results, BLOCK_S at a time (online rescaling)."""
    pid = tl.program_id(0).to(tl.int64)
    b, j = pid // qheads, pid % qheads
    first = (b * heads + j // group) * splits  # the split rows of this head's KV head
    d = tl.arange(0, D)
    big_m = tl.full((1,), float("-inf"), tl.float32)
    big_l = tl.zeros((1,), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for i0 in range(0, splits, BLOCK_S):
        i = i0 + tl.arange(0, BLOCK_S)
        im = i < splits
        row = (first + i) * group + j % group
        m_s = tl.load(stat_ptr + row * 2, mask=im, other=float("-inf"))
        l_s = tl.load(stat_ptr + row * 2 + 1, mask=im, other=0.0)
        m_new = tl.maximum(big_m, tl.max(m_s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(m_s - m_use)
        alpha = tl.exp2(big_m - m_use)
        o = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=im[:, None], other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        big_l = big_l * alpha + tl.sum(l_s * w, axis=0)
        big_m = m_new
    tl.store(out_ptr + b * osb + j * osh + d, (acc / big_l).to(out_ptr.dtype.element_ty))
    if SCORES:  # log2 of the softmax denominator: weights = exp2(logits - lse)
        tl.store(lse_ptr + pid + tl.arange(0, 1), big_m + tl.log2(big_l))


def _store_tensors(store) -> tuple[int, list[torch.Tensor], int]:
    """(kind, its tensors, `full`) of a store; the tensors are looked up at every call because offload and swap
    point a store at other buffers (of the same shape and strides)."""
    tensors, full = store.kernel_tensors()
    return store.KERNEL, tensors, full


def _strides(kind: int, tensors: list[torch.Tensor]) -> list[int]:
    """The order the tile loaders take them in: dense (B, H, S) of the keys (values have the same); quantized, the
    first four strides of each tensor in turn."""
    return list(tensors[0].stride()[:3]) if kind == DENSE else [x for t in tensors for x in t.stride()[:4]]


def _store_args(store) -> tuple[int, list[torch.Tensor], torch.Tensor, int]:
    """(kind, five tensors, strides as a device tensor, `full`). A strides tensor is made once per distinct set of
    strides and device and shared by every store with those strides, so a decode step does no host-to-device copy, and
    a CUDA graph captured over one store still finds the same tensor after the cache rebuilt its store objects."""
    kind, tensors, full = _store_tensors(store)
    strides = _strides(kind, tensors)
    key = (tuple(strides), str(tensors[0].device))
    st = _STRIDES.get(key)
    if st is None:
        st = _STRIDES[key] = torch.tensor(strides + [0] * (20 - len(strides)), dtype=torch.int64,
                                          device=tensors[0].device)
    return kind, tensors + [tensors[0]] * (5 - len(tensors)), st, full


_STRIDES: dict = {}


def split_size(kind: int, upto: int, rows: int, tuning: dict | None = None) -> int:
    """Slots per program of the split kernel: the format's tuned size, larger at long contexts so that about
    `PROGRAMS_PER_SM` programs per multiprocessor share the work (fewer splits to merge, longer loops to pipeline)."""
    tune = tuning or TUNING[kind]
    target = max(1, (PROGRAMS_PER_SM * _multiprocessors()) // max(1, rows))
    size = triton.next_power_of_2(max(1, triton.cdiv(upto, target)))
    return int(min(MAX_SPLIT, max(tune["SPLIT"], size)))


_SMS: dict = {}


def _multiprocessors() -> int:
    if "n" not in _SMS:
        _SMS["n"] = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else 132
    return _SMS["n"]


def decode_attention(store, query: torch.Tensor, valid: torch.Tensor, own: torch.Tensor, upto: int,
                     scaling: float, weights: bool = False, tuning: dict | None = None):
    """Attention output [B, Hq, 1, D] of one query per row over slots [0, upto) of `store`.

    query [B, Hq, 1, D]; valid bool [B, H, slots]; own long [B, H]: the slot the query's own token was written to,
    visible even when that token is padding (and so not valid). With `weights`, returns (output, weights) where
    weights [B, H, 1, upto] fp32 is the softmax averaged over each KV head's query heads (what
    `attention.attention_weights` gives a policy), from the kernel's own logits: no second pass over the keys. `tuning`
    (SPLIT, BLOCK_N, NUM_WARPS) replaces the format's tuned launch settings (`TUNING[store.KERNEL]`), for
    benchmarks."""
    b, hq, _, d = query.shape
    heads = valid.shape[1]
    group = hq // heads
    kind, (a0, a1, a2, a3, a4), st, full = _store_args(store)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows: the group is padded
    tune = {**TUNING[kind], **(tuning or {})}
    split = split_size(kind, upto, b * heads, tune)
    splits = triton.cdiv(upto, split)
    part = torch.empty(b * heads * splits * group * d, dtype=torch.float32, device=query.device)
    stat = torch.empty(b * heads * splits * group * 2, dtype=torch.float32, device=query.device)
    out = torch.empty(b, hq, 1, d, dtype=query.dtype, device=query.device)
    scores = torch.empty(b * hq, upto, dtype=torch.float32, device=query.device) if weights else stat
    lse = torch.empty(b * hq, dtype=torch.float32, device=query.device) if weights else stat
    _kvscope_decode_split[(splits, b * heads)](
        query, valid, own, a0, a1, a2, a3, a4, st, part, stat, scores, upto, splits, heads, group, full,
        scaling * LOG2E, query.stride(0), query.stride(1), valid.stride(0), valid.stride(1), own.stride(0),
        own.stride(1), upto, D=d, BLOCK_G=block_g, BLOCK_N=tune["BLOCK_N"], SPLIT=split, KIND=kind,
        GROUP=INT4_GROUP, R=INT4_RESIDUAL, SCORES=weights, num_warps=tune["NUM_WARPS"])
    _kvscope_decode_combine[(b * hq,)](part, stat, out, lse, splits, heads, group, hq, out.stride(0), out.stride(1),
                                       D=d, BLOCK_S=COMBINE_BLOCK, SCORES=weights)
    if not weights:
        return out
    mean = torch.empty(b, heads, 1, upto, dtype=torch.float32, device=query.device)
    _kvscope_decode_weights[(b * heads, triton.cdiv(upto, WEIGHTS_BLOCK))](
        scores, lse, mean, upto, group, GROUP_BLOCK=triton.next_power_of_2(group), BLOCK=WEIGHTS_BLOCK)
    return out, mean


@_jit("upto", "group")
def _kvscope_decode_weights(score_ptr, lse_ptr, out_ptr, upto, group, GROUP_BLOCK: tl.constexpr,
                            BLOCK: tl.constexpr):
    """weights[b, h, 0, s] = mean over the group's query heads j of exp2(logit[j, s] - lse[j]) (one launch instead
    of subtract, exp2 and mean)."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, GROUP_BLOCK)
    jm = j < group
    rows = bh * group + j
    lse = tl.load(lse_ptr + rows, mask=jm, other=0.0)
    logits = tl.load(score_ptr + rows[:, None] * upto + s[None, :], mask=jm[:, None] & (s < upto)[None, :],
                     other=float("-inf"))
    w = tl.sum(tl.exp2(logits - lse[:, None]), axis=0) / group
    tl.store(out_ptr + bh * upto + s, w, mask=s < upto)
