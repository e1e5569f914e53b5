"""One launch for a decode token's RoPE and insert (kvscope.cache.static.insert): rotate the queries and the key,
take the queue's slot, write the key and value (dense stores; a quantized store's own write kernel runs after), mark
the slot valid with its position, raise the row's newest position and write the policy's score when it is one the
kernel knows (`Policy.insert_score`). Imported only on CUDA with Triton.

RoPE rounds as the model's PyTorch ops do (kvscope.runtime.kernels.rotate): each product and the sum go to the model
dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.policies.base import INSERT_SCORES

_ARGS = ("heads", "qheads", "slots", "qlen", "qsb", "qsh", "ksb", "ksh", "vsb", "vsh")


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, b, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Rotate one head vector (2 * HALF contiguous values at x_ptr) in place; returns the rotated halves."""
    j = tl.arange(0, BLOCK)
    m = j < HALF
    lo = tl.load(x_ptr + j, mask=m, other=0.0)
    hi = tl.load(x_ptr + HALF + j, mask=m, other=0.0)
    dt = lo.dtype
    c_lo = tl.load(cos_ptr + b * 2 * HALF + j, mask=m, other=0.0).to(tl.float32)
    c_hi = tl.load(cos_ptr + b * 2 * HALF + HALF + j, mask=m, other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + b * 2 * HALF + j, mask=m, other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + b * 2 * HALF + HALF + j, mask=m, other=0.0).to(tl.float32)
    lof, hif = lo.to(tl.float32), hi.to(tl.float32)
    out_lo = ((lof * c_lo).to(dt).to(tl.float32) + (-hif * s_lo).to(dt).to(tl.float32)).to(dt)
    out_hi = ((hif * c_hi).to(dt).to(tl.float32) + (lof * s_hi).to(dt).to(tl.float32)).to(dt)
    tl.store(x_ptr + j, out_lo, mask=m)
    tl.store(x_ptr + HALF + j, out_hi, mask=m)
    return out_lo, out_hi


@triton.jit(do_not_specialize=_ARGS)
def _insert(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, queue_ptr, ptr_ptr, pos_ptr, valid_ptr,
            position_ptr, newest_ptr, slot_ptr, score_ptr, heads, qheads, slots, qlen, qsb, qsh, ksb, ksh, vsb, vsh,
            HALF: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr, WRITE_KV: tl.constexpr,
            SCORE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    if i < qheads:  # a query head: rotate it (nothing else to do)
        if ROPE:
            _rope(q_ptr + b * qsb + i * qsh, cos_ptr, sin_ptr, b, HALF, BLOCK)
    else:
        h = i - qheads
        bh = b * heads + h
        slot = tl.load(queue_ptr + bh * qlen + tl.load(ptr_ptr)).to(tl.int64)
        pos = tl.load(pos_ptr + b)
        if ROPE:
            _rope(k_ptr + b * ksb + h * ksh, cos_ptr, sin_ptr, b, HALF, BLOCK)
        if WRITE_KV:
            j = tl.arange(0, BLOCK)
            m = j < HALF
            base = (bh * slots + slot) * (2 * HALF)
            for part in tl.static_range(2):  # the two halves of the head dimension
                k = tl.load(k_ptr + b * ksb + h * ksh + part * HALF + j, mask=m)
                v = tl.load(v_ptr + b * vsb + h * vsh + part * HALF + j, mask=m)
                tl.store(keys_ptr + base + part * HALF + j, k.to(keys_ptr.dtype.element_ty), mask=m)
                tl.store(values_ptr + base + part * HALF + j, v.to(values_ptr.dtype.element_ty), mask=m)
        tl.store(valid_ptr + bh * slots + slot, 1)
        tl.store(position_ptr + bh * slots + slot, pos)
        tl.store(newest_ptr + bh, tl.maximum(tl.load(newest_ptr + bh), pos))
        tl.store(slot_ptr + bh, slot)
        if SCORE == 1:  # INSERT_SCORES: "zero"
            tl.store(score_ptr + bh * slots + slot, 0.0)
        if SCORE == 2:  # "position"
            tl.store(score_ptr + bh * slots + slot, pos.to(tl.float32))


def insert(layer, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor, ptr: torch.Tensor,
           rope=None) -> torch.Tensor:
    """`rope` = (query [B, Hq, 1, D], cos, sin [B, 1, D]): query and key are rotated in place first."""
    store = layer.store
    slot = layer.slot_out  # [B, H, 1] int64, owned by the layer: the same buffer at every step (graph-safe)
    dense = store.KERNEL == 0
    _launch(layer, key, value, position, ptr, slot, rope, write_kv=dense)
    if not dense:  # the quantized store's own write kernel, into the slot just taken
        store.write(slot, key, value)
    return slot


def _launch(layer, key, value, position, ptr, slot, rope, write_kv: bool) -> None:
    st, store, queue = layer.state, layer.store, layer.queue
    b, h, _, d = key.shape
    q, cos, sin = rope if rope is not None else (key, key, key)
    qheads = q.shape[1] if rope is not None else 0
    keys, values = (store.keys, store.values) if write_kv else (st.position, st.position)
    _insert[(b, qheads + h)](q, key, value, cos.contiguous(), sin.contiguous(), keys, values, queue, ptr, position,
                             st.valid.view(torch.uint8), st.position, st.newest, slot, st.score, h, qheads,
                             st.valid.shape[-1], queue.shape[-1], q.stride(0), q.stride(1), key.stride(0),
                             key.stride(1), value.stride(0), value.stride(1), HALF=d // 2,
                             BLOCK=triton.next_power_of_2(d // 2), ROPE=rope is not None, WRITE_KV=write_kv,
                             SCORE=_score_code(layer.settings.policy.insert_score), num_warps=1)


def _score_code(insert_score: str | None) -> int:
    """The kernel's SCORE: 0 writes none (the policy's on_insert runs), then 1 + the index in INSERT_SCORES."""
    return 0 if insert_score is None else 1 + INSERT_SCORES.index(insert_score)
