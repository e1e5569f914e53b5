"""One launch for a decode token's insert (kvscope.cache.static.insert): take the queue's slot, write the key and
value (dense stores; a quantized store's own write kernel runs first), mark the slot valid with its position and
raise the row's newest position. Imported only on CUDA with Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ARGS = ("heads", "slots", "qlen", "ksb", "ksh", "vsb", "vsh")


@triton.jit(do_not_specialize=_ARGS)
def _insert(k_ptr, v_ptr, keys_ptr, values_ptr, queue_ptr, ptr_ptr, pos_ptr, valid_ptr, position_ptr, newest_ptr,
            slot_ptr, heads, slots, qlen, ksb, ksh, vsb, vsh, D: tl.constexpr, BLOCK_D: tl.constexpr,
            WRITE_KV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    slot = tl.load(queue_ptr + bh * qlen + tl.load(ptr_ptr)).to(tl.int64)
    pos = tl.load(pos_ptr + b)
    if WRITE_KV:
        d = tl.arange(0, BLOCK_D)
        m = d < D
        k = tl.load(k_ptr + b * ksb + h * ksh + d, mask=m)
        v = tl.load(v_ptr + b * vsb + h * vsh + d, mask=m)
        tl.store(keys_ptr + (bh * slots + slot) * D + d, k.to(keys_ptr.dtype.element_ty), mask=m)
        tl.store(values_ptr + (bh * slots + slot) * D + d, v.to(values_ptr.dtype.element_ty), mask=m)
    tl.store(valid_ptr + bh * slots + slot, 1)
    tl.store(position_ptr + bh * slots + slot, pos)
    tl.store(newest_ptr + bh, tl.maximum(tl.load(newest_ptr + bh), pos))
    tl.store(slot_ptr + bh, slot)


def insert(layer, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    store = layer.store
    slot = layer.slot_out  # [B, H, 1] int64, owned by the layer: the same buffer at every step (graph-safe)
    if store.KERNEL != 0:  # the quantized store's own write kernel needs the slot first: mark, then write
        _launch(layer, key, value, position, ptr, slot, write_kv=False)
        store.write(slot, key, value)
        return slot
    _launch(layer, key, value, position, ptr, slot, write_kv=True)
    return slot


def _launch(layer, key, value, position, ptr, slot, write_kv: bool) -> None:
    st, store, queue = layer.state, layer.store, layer.queue
    b, h, _, d = key.shape
    keys, values = (store.keys, store.values) if write_kv else (st.position, st.position)
    _insert[(b * h,)](key, value, keys, values, queue, ptr, position, st.valid.view(torch.uint8), st.position,
                      st.newest, slot, h, st.valid.shape[-1], queue.shape[-1], key.stride(0), key.stride(1),
                      value.stride(0), value.stride(1), D=d, BLOCK_D=triton.next_power_of_2(d), WRITE_KV=write_kv,
                      num_warps=1)
