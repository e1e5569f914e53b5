"""Fused CUDA kernels (Triton) for the quantized stores' per-step work: one launch instead of 10-20 PyTorch ops.

Why: at decode a layer writes one token and reads the whole cache; with small models that is bound by the CPU cost of
launching each PyTorch op (about 12 us each on an H100 host), not by the GPU. These kernels compute exactly what the
eager code in kvscope.cache.quant computes (same formulas, same fp16 rounding of parameters, IEEE division and
round-half-even), up to the last bit of a fused multiply-add; tests marked `gpu` compare the two.

Compilation happens during the first prefill and never again mid-decode: the write kernels specialize on nothing that
varies (every integer and pointer argument is left unspecialized: token counts, offsets and input strides change from
chunk to decode step), the read kernels only on what is fixed for a store (its tensors, strides and sizes: aligned,
so loads and stores vectorize), not on `upto`.

Imported only when a store lives on CUDA and Triton is installed (`kvscope.cache.quant._kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvscope.kvformats import INT4_GROUP, INT4_RESIDUAL

BLOCK_S = 32  # slots per program in the read kernels


def _jit(*names: str):
    """triton.jit with no specialization on the named arguments (values, divisibility by 16, pointer alignment)."""
    try:
        return triton.jit(do_not_specialize=names, do_not_specialize_on_alignment=names)
    except TypeError:  # older Triton: no alignment option
        return triton.jit(do_not_specialize=names)


_DUMMY: dict = {}


def _no_slots(device) -> torch.Tensor:
    """An int64 placeholder for `slots` in range writes (same pointer type, so no second compile)."""
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=torch.long, device=device)
    return _DUMMY[key]


def _slot_args(slots, start: int, device):
    if slots is None:
        return _no_slots(device), start, 0, (0, 0, 0)
    return slots, 0, 1, slots.stride()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --- tile loaders: shared by the read kernels here and the fused decode attention (kvscope.cache.attention_triton) --

@triton.jit
def pertoken_tile(data_ptr, params_ptr, kv, b, h, s, rows, d, m, dsb, dsh, dss, dsk, psb, psh, pss, psk,
                  FP8: tl.constexpr):
    """fp32 [len(s), len(d)]: keys (kv 0) or values (kv 1) of slots `s` of row (b, h) of an fp8/int8 store."""
    codes = tl.load(data_ptr + b * dsb + h * dsh + kv * dsk + s[:, None] * dss + d[None, :], mask=m)
    params = params_ptr + b * psb + h * psh + kv * psk + s * pss
    scale = tl.load(params, mask=rows, other=1.0).to(tl.float32)[:, None]
    if FP8:
        x = codes.to(tl.float32) * scale
    else:
        x = codes.to(tl.float32) * scale + tl.load(params + 1, mask=rows, other=0.0).to(tl.float32)[:, None]
    # masked lanes are undefined (an fp8 byte may read as NaN, and 0 * NaN would poison the decode kernel's tl.dot)
    return tl.where(m, x, 0.0)


@triton.jit
def int4_tile(packed_ptr, kp_ptr, tp_ptr, vp_ptr, res_ptr, kv, b, h, s, rows, d, m, full,
              ak, ab, ah, as_, kb, kh, kg, kj, tb, th, tt, tj, vb, vh, vs, vj, rk, rb, rh, rr,
              GROUP: tl.constexpr, R: tl.constexpr):
    """fp32 [len(s), len(d)]: keys (kv 0) or values (kv 1) of slots `s` of row (b, h) of an int4 store, pending
    slots taken from the ring (see Int4Store)."""
    byte = tl.load(packed_ptr + kv * ak + b * ab + h * ah + s[:, None] * as_ + (d // 2)[None, :], mask=m, other=0)
    code = ((byte.to(tl.int32) >> ((d % 2) * 4)[None, :]) & 15).to(tl.float32)
    cg = (d // GROUP)[None, :]
    vp = vp_ptr + b * vb + h * vh + s[:, None] * vs
    if kv == 0:  # keys: per-channel parameters of the slot's group, or per-token ones in the tail
        grouped = (s < full)[:, None]
        kp = kp_ptr + b * kb + h * kh + (s // GROUP)[:, None] * kg + d[None, :]
        tp = tp_ptr + b * tb + h * th + (s - full)[:, None] * tt + cg
        scale = tl.where(grouped, tl.load(kp, mask=m & grouped, other=0.0), tl.load(tp, mask=m & ~grouped, other=0.0))
        zero = tl.where(grouped, tl.load(kp + kj, mask=m & grouped, other=0.0),
                        tl.load(tp + tj, mask=m & ~grouped, other=0.0))
    else:
        scale = tl.load(vp + cg, mask=m, other=0.0)
        zero = tl.load(vp + vj + cg, mask=m, other=0.0)
    x = code * scale.to(tl.float32) + zero.to(tl.float32)
    # the slot's state marker (first value scale): negative = pending in ring entry -1 - m (or never written)
    marker = tl.load(vp_ptr + b * vb + h * vh + s * vs, mask=rows, other=0.0).to(tl.float32)
    pending = (marker < 0)[:, None]
    entry = tl.minimum(tl.maximum(-1.0 - marker, 0.0), R - 1.0).to(tl.int64)
    ring = tl.load(res_ptr + kv * rk + b * rb + h * rh + entry[:, None] * rr + d[None, :], mask=m & pending, other=0.0)
    return tl.where(pending, ring.to(tl.float32), x)


# --- fp8 / int8 ----------------------------------------------------------------------------------------------------

_PT_ARGS = ("k_ptr", "v_ptr", "slots_ptr", "data_ptr", "params_ptr", "n", "heads", "start", "has_slots",
            "ksb", "ksh", "ksn", "vsb", "vsh", "vsn", "ssb", "ssh", "ssn", "dsb", "dsh", "dss", "dsk",
            "psb", "psh", "pss", "psk")


@_jit(*_PT_ARGS)
def _pertoken_write(k_ptr, v_ptr, slots_ptr, data_ptr, params_ptr, n, heads, start, has_slots,
                    ksb, ksh, ksn, vsb, vsh, vsn, ssb, ssh, ssn, dsb, dsh, dss, dsk, psb, psh, pss, psk,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # ((b * heads) + h) * n + i
    kv = tl.program_id(1)
    i = row % n
    b = row // n // heads
    h = row // n % heads
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    if kv == 0:
        x = tl.load(k_ptr + b * ksb + h * ksh + i * ksn + d, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(v_ptr + b * vsb + h * vsh + i * vsn + d, mask=mask, other=0.0).to(tl.float32)
    if has_slots:  # noqa: SIM108 - Triton has no conditional expression on runtime values
        slot = tl.load(slots_ptr + b * ssb + h * ssh + i * ssn).to(tl.int64)
    else:
        slot = start + i
    codes = data_ptr + b * dsb + h * dsh + slot * dss + kv * dsk + d
    params = params_ptr + b * psb + h * psh + slot * pss + kv * psk
    if FP8:
        amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
        # constants as in kvscope.cache.quant: FP8_MAX, FP8_SCALE_MIN = 2**-14, FP16_MAX
        scale = tl.minimum(tl.maximum(amax * (1.0 / 448.0), 6.103515625e-05), 65504.0).to(tl.float16)
        q = tl.math.div_rn(x, scale.to(tl.float32))
        tl.store(codes, tl.minimum(tl.maximum(q, -448.0), 448.0).to(tl.float8e4nv), mask=mask)
        tl.store(params, scale)
    else:
        lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
        hi = tl.max(tl.where(mask, x, -float("inf")), axis=0)
        span = tl.maximum(hi - lo, 0.01556396484375) * (1.0 / 255.0)  # INT8_SPAN_MIN = 255 * 2**-14
        scale = tl.minimum(tl.maximum(span, -65504.0), 65504.0).to(tl.float16)
        zero = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16)
        q = libdevice.rint(tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32)))
        tl.store(codes, tl.minimum(tl.maximum(q, 0.0), 255.0).to(tl.uint8), mask=mask)
        tl.store(params, scale)
        tl.store(params + 1, zero)


def pertoken_write(store, slots, start: int, keys, values, fp8: bool) -> None:
    b, h, n, d = keys.shape
    keys, values = _rows(keys), _rows(values)
    slots_t, start, has, ss = _slot_args(slots, start, keys.device)
    data, params = store.data, store.params
    _pertoken_write[(b * h * n, 2)](
        keys, values, slots_t, data, params, n, h, start, has, *keys.stride()[:3], *values.stride()[:3], *ss,
        *data.stride()[:4], *params.stride()[:4], D=d, BLOCK_D=triton.next_power_of_2(d), FP8=fp8)


@_jit("upto")
def _pertoken_read(data_ptr, params_ptr, out_ptr, upto, slots, heads, dsb, dsh, dss, dsk, psb, psh, pss, psk,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2).to(tl.int64)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    rows = s < upto
    m = rows[:, None] & (d < D)[None, :]
    x = pertoken_tile(data_ptr, params_ptr, kv, b, h, s, rows, d, m, dsb, dsh, dss, dsk, psb, psh, pss, psk, FP8)
    out = out_ptr + ((kv * tl.num_programs(1) + bh) * slots + s[:, None]) * D + d[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=m)


def _output(b: int, h: int, slots: int, d: int, dtype, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """[2, B, H, slots, D] of which a read fills [0, upto): `out` when it is that tensor (the cache's read buffer,
    kvscope.kvformats.READ_BUFFER), else a fresh one; the same strides at every step, as `DenseStore.read` gives."""
    if out is not None and out.shape == (2, b, h, slots, d) and out.dtype == dtype and out.is_contiguous():
        return out
    return torch.empty(2, b, h, slots, d, dtype=dtype, device=device)


def pertoken_read(store, upto: int, dtype, fp8: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """[2, B, H, slots, D]: keys and values of slots [0, upto) in [:, :, :, :upto], the rest unset."""
    data, params = store.data, store.params
    b, h, slots, _, d = data.shape
    out = _output(b, h, slots, d, dtype, data.device, out)
    _pertoken_read[(triton.cdiv(upto, BLOCK_S), b * h, 2)](
        data, params, out, upto, slots, h, *data.stride()[:4], *params.stride()[:4], D=d,
        BLOCK_D=triton.next_power_of_2(d), BLOCK=BLOCK_S, FP8=fp8)
    return out


# --- int4 ----------------------------------------------------------------------------------------------------------

@_jit("upto")
def _int4_read(packed_ptr, kp_ptr, tp_ptr, vp_ptr, res_ptr, out_ptr, upto, slots, heads, full,
               ak, ab, ah, as_, kb, kh, kg, kj, tb, th, tt, tj, vb, vh, vs, vj, rk, rb, rh, rr,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2).to(tl.int64)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    rows = s < upto
    m = rows[:, None] & (d < D)[None, :]
    x = int4_tile(packed_ptr, kp_ptr, tp_ptr, vp_ptr, res_ptr, kv, b, h, s, rows, d, m, full,
                  ak, ab, ah, as_, kb, kh, kg, kj, tb, th, tt, tj, vb, vh, vs, vj, rk, rb, rh, rr, GROUP, R)
    out = out_ptr + ((kv * tl.num_programs(1) + bh) * slots + s[:, None]) * D + d[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=m)


def int4_read(store, upto: int, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """[2, B, H, slots, D]: keys and values of slots [0, upto) in [:, :, :, :upto], the rest unset."""
    packed, res = store.packed, store.residual
    _, b, h, slots, half = packed.shape
    d = 2 * half
    out = _output(b, h, slots, d, dtype, packed.device, out)
    kp, tp, vp = store.key_params, store.tail_params, store.value_params
    _int4_read[(triton.cdiv(upto, BLOCK_S), b * h, 2)](
        packed, kp, tp, vp, res, out, upto, slots, h, store.groups * INT4_GROUP, *packed.stride()[:4], *kp.stride()[:4],
        *tp.stride()[:4], *vp.stride()[:4], *res.stride()[:4], D=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK=BLOCK_S, GROUP=INT4_GROUP, R=INT4_RESIDUAL)
    return out


_I4W_ARGS = ("k_ptr", "v_ptr", "slots_ptr", "res_ptr", "vp_ptr", "n", "heads", "head", "start", "has_slots",
             "ksb", "ksh", "ksn", "vsb", "vsh", "vsn", "ssb", "ssh", "ssn", "rk", "rb", "rh", "rr", "vb", "vh", "vs")


@_jit(*_I4W_ARGS)
def _int4_ring_write(k_ptr, v_ptr, slots_ptr, res_ptr, vp_ptr, n, heads, head, start, has_slots,
                     ksb, ksh, ksn, vsb, vsh, vsn, ssb, ssh, ssn, rk, rb, rh, rr, vb, vh, vs,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = row % n
    b = row // n // heads
    h = row // n % heads
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    entry = (head + i) % R
    k = tl.load(k_ptr + b * ksb + h * ksh + i * ksn + d, mask=mask)
    v = tl.load(v_ptr + b * vsb + h * vsh + i * vsn + d, mask=mask)
    ring = res_ptr + b * rb + h * rh + entry * rr + d
    tl.store(ring, k.to(res_ptr.dtype.element_ty), mask=mask)
    tl.store(ring + rk, v.to(res_ptr.dtype.element_ty), mask=mask)
    if has_slots:  # noqa: SIM108 - Triton has no conditional expression on runtime values
        slot = tl.load(slots_ptr + b * ssb + h * ssh + i * ssn).to(tl.int64)
    else:
        slot = start + i
    tl.store(vp_ptr + b * vb + h * vh + slot * vs, (-1.0 - entry.to(tl.float32)).to(tl.float16))


def int4_ring_write(store, slots, start: int, keys, values) -> None:
    b, h, n, d = keys.shape
    keys, values = _rows(keys), _rows(values)
    slots_t, start, has, ss = _slot_args(slots, start, keys.device)
    res, vp = store.residual, store.value_params
    _int4_ring_write[(b * h * n,)](
        keys, values, slots_t, res, vp, n, h, store.head, start, has, *keys.stride()[:3], *values.stride()[:3], *ss,
        *res.stride()[:4], *vp.stride()[:3], D=d, BLOCK_D=triton.next_power_of_2(d), R=INT4_RESIDUAL)
