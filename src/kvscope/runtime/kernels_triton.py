"""Triton versions of kvscope.runtime.kernels (imported only when a tensor lives on CUDA and Triton is installed).

Every function takes and returns what its PyTorch twin does; the arithmetic rounds to the model dtype at the same
places as the model's own PyTorch ops (see kvscope.runtime.kernels). Shapes are fixed for a model, so each kernel
compiles once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm(res_ptr, delta_ptr, w_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(res_ptr + row * n + i, mask=m, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * n + i, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * n + i, x, mask=m)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) / n
    y = (xf * tl.math.rsqrt(ms + eps)).to(x.dtype)
    w = tl.load(w_ptr + i, mask=m, other=0.0)
    tl.store(out_ptr + row * n + i, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = residual.shape[-1]
    rows = residual.numel() // n
    out_dtype = torch.promote_types(weight.dtype, residual.dtype)
    out = torch.empty(residual.shape, dtype=out_dtype, device=residual.device)
    _add_rmsnorm[(rows,)](residual, delta if delta is not None else residual, weight, out, n, eps,
                          HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, heads, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """In place: one (row, head) vector of D = 2 * HALF per program; cos/sin [B, 1, D]."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    m = j < HALF
    base = x_ptr + (row * heads + head) * (2 * HALF)
    lo = tl.load(base + j, mask=m, other=0.0)
    hi = tl.load(base + HALF + j, mask=m, other=0.0)
    dt = lo.dtype
    c_lo = tl.load(cos_ptr + row * 2 * HALF + j, mask=m, other=0.0).to(tl.float32)
    c_hi = tl.load(cos_ptr + row * 2 * HALF + HALF + j, mask=m, other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + row * 2 * HALF + j, mask=m, other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + row * 2 * HALF + HALF + j, mask=m, other=0.0).to(tl.float32)
    lof, hif = lo.to(tl.float32), hi.to(tl.float32)
    # x * cos + rotate_half(x) * sin, rounded after each op as the model's PyTorch ops round
    out_lo = ((lof * c_lo).to(dt).to(tl.float32) + (-hif * s_lo).to(dt).to(tl.float32)).to(dt)
    out_hi = ((hif * c_hi).to(dt).to(tl.float32) + (lof * s_hi).to(dt).to(tl.float32)).to(dt)
    tl.store(base + j, out_lo, mask=m)
    tl.store(base + HALF + j, out_hi, mask=m)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """In place on contiguous q [B, Hq, 1, D] and k [B, Hkv, 1, D] (cos/sin [B, 1, D] in their dtype)."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    block = triton.next_power_of_2(d // 2)
    _rotate[(b, hq)](q, cos, sin, hq, HALF=d // 2, BLOCK=block, num_warps=1)
    _rotate[(b, hk)](k, cos, sin, hk, HALF=d // 2, BLOCK=block, num_warps=1)
    return q, k


@triton.jit
def _silu_mul(g_ptr, u_ptr, out_ptr, n, g_row, u_row, BLOCK: tl.constexpr):
    """Row `program_id(0)`, columns of block `program_id(1)`; gate and up may be views with row strides (the halves of
    one stacked product)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + row * g_row + i, mask=m, other=0.0)
    u = tl.load(u_ptr + row * u_row + i, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * n + i, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] with unit stride along I (rows may be strided); the result is contiguous."""
    n = gate.shape[-1]
    rows = gate.numel() // n
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    g, u = gate.reshape(rows, n), up.reshape(rows, n)
    _silu_mul[(rows, triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0), BLOCK=block, num_warps=4)
    return out
