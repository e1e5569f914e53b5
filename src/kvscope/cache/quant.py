"""Quantized slot stores for `BudgetedCache`: fp8, int8 and int4 (KIVI).

Same contract as `DenseStore` (kvscope.cache.store): `write`/`write_range` put N new tokens per (sequence, KV head)
row into slots, `read(upto, dtype)` returns dense keys and values of slots [0, upto), `nbytes` is exactly what was
allocated and `tensors()` is every tensor the store owns (names are attribute names, so a swap can copy them out and
back in place). The byte layout is the one `kvscope.kvformats` prices, to the byte:

    nbytes == batch * heads * slots * kv_format(name).bytes_per_head_token(head_dim, dense)
              + batch * heads * residual_tokens() * 2 * head_dim * dense      (dense: bytes of the compute dtype)

Every store allocates once, in `__init__`. `read` dequantizes keys and values of [0, upto) together into one fresh
[2, B, H, upto, D] tensor (fused path: [2, B, H, slots, D], so the size and strides are the same at every step) and
returns its two halves; nothing loops over tokens. `read(..., out=)` gives the fused read that tensor to fill (the
cache's shared read buffer, kvscope.kvformats.READ_BUFFER); so does the eager read of fp8 and int8 (int4's eager
read, the CPU reference, allocates its own). `nbytes` does not
count that output: like the `.to(dtype)` of a dense read it is a transient of the attention step. On CUDA, when
Triton is installed, the per-step work (quantize-and-write, read, the int4 ring write) runs as one fused kernel each
(kvscope.cache.quant_triton, dispatched by kvscope.cache.fused). The eager code is the reference, used on CPU and
as the fallback (`KVSCOPE_TRITON=0` forces it); the int4 flush, once every 64 tokens, is always eager.

- `fp8`: e4m3 elements, one fp16 absmax/448 scale per (token, head) for keys and one for values.
- `int8`: per-token asymmetric codes 0..255, fp16 scale and zero point per (token, head) for keys and for values.
- `int4`: see `Int4Store` (kvscope.cache.quant_int4).
"""

from __future__ import annotations

import torch

from kvscope.cache import fused
from kvscope.cache.arena import allocate, layout_of

FP16_MAX = 65504.0
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# smallest value range a scale may cover: keeps scales normal fp16 numbers (and never zero, so no 0/0)
INT8_SPAN_MIN = 255 * 2.0**-14
INT4_SPAN_MIN = 15 * 2.0**-14
FP8_SCALE_MIN = 2.0**-14


def _fast(t: torch.Tensor, kernel: str, *args) -> tuple[bool, object]:
    """(True, result) when Triton kernel `kernel` of kvscope.cache.quant_triton ran for storage `t`."""
    return fused.run(t, f"quant_triton.{kernel}", *args)


class _Store:
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the store owns, by attribute name (for swap and byte accounting)."""
        return {name: getattr(self, name) for name in self.TENSORS}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Point the store at other buffers of the same shapes (offload staging, a swapped-in arena)."""
        for name in self.TENSORS:
            setattr(self, name, tensors[name])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


# --- fp8 and int8: one quantization group per (token, head) ------------------------------------------------------


class _PerTokenStore(_Store):
    """Codes in `data` [B, H, slots, 2 (keys, values), D], per-token parameters in `params` [B, H, slots, 2, P].

    Slots are dim 2 of every tensor, as in `DenseStore` (offload copies slot ranges back by that dim).
    """

    TENSORS = ("data", "params")
    CODE_DTYPE: torch.dtype
    PARAMS: int  # fp16 parameters per (token, head): fp8 a scale, int8 a scale and a zero point

    def __init__(self, batch, heads, slots, head_dim, compute_dtype, device, tensors=None):
        t = tensors or allocate(layout_of(self.NAME, batch, heads, slots, head_dim, compute_dtype), device)
        self.data, self.params = t["data"], t["params"]
        self.params[..., 0] = 1.0  # never-written slots read as finite zeros whatever the format

    def kernel_tensors(self) -> tuple[list[torch.Tensor], int]:
        return [self.data, self.params], 0

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._write(slots, 0, keys, values)

    def write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._write(None, start, keys, values)

    def _write(self, slots: torch.Tensor | None, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Into `slots` [B, H, N], or, when None, into [start, start + N)."""
        if _fast(self.data, "pertoken_write", self, slots, start, keys, values, self.FP8)[0]:
            return
        codes, params = self.quantize(torch.stack((keys, values), dim=3).float())
        if slots is None:
            n = codes.shape[2]
            self.data[:, :, start:start + n].copy_(codes)
            self.params[:, :, start:start + n].copy_(params)
            return
        index = slots[..., None, None]
        _bytes(self.data).scatter_(2, index.expand(codes.shape), _bytes(codes))
        self.params.scatter_(2, index.expand(params.shape), params)

    def read(self, upto: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ran, kv = _fast(self.data, "pertoken_read", self, upto, dtype, self.FP8, out)
        if ran:
            return kv[0, :, :, :upto], kv[1, :, :, :upto]
        # [2, B, H, upto, ...] views in; out: [:, :, :, :upto] of the read buffer, or a fresh [2, B, H, upto, D]
        kv = self.dequantize(self.data[:, :, :upto].permute(3, 0, 1, 2, 4),
                             self.params[:, :, :upto].permute(3, 0, 1, 2, 4), dtype,
                             None if out is None else out[:, :, :, :upto])
        return kv[0], kv[1]


class Int8Store(_PerTokenStore):
    """x ~ code * scale + zero, code = round((x - min) / scale) in 0..255, scale = (max - min) / 255 per token."""

    CODE_DTYPE = torch.uint8
    PARAMS = 2  # scale, zero point
    FP8 = False
    KERNEL = 2
    NAME = "int8"

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
        scale = (hi - lo).clamp_min_(INT8_SPAN_MIN).div_(255)
        params = torch.cat((scale, lo), -1).clamp_(-FP16_MAX, FP16_MAX).half()
        # quantize with the stored (fp16-rounded) scale and zero, so codes and parameters agree
        codes = (x - params[..., 1:]).div_(params[..., :1]).round_().clamp_(0, 255).to(torch.uint8)
        return codes, params

    @staticmethod
    def dequantize(codes, params, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        # one kernel: uint8 codes and fp16 parameters are promoted inside addcmul, written straight to `dtype`
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device) if out is None else out
        return torch.addcmul(params[..., 1:], codes, params[..., :1], out=out)


class Fp8Store(_PerTokenStore):
    """x ~ e4m3(x / scale) * scale, scale = absmax / 448 per token."""

    CODE_DTYPE = torch.float8_e4m3fn
    PARAMS = 1  # scale
    FP8 = True
    KERNEL = 1
    NAME = "fp8"

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(-1, keepdim=True).div_(FP8_MAX).clamp_(FP8_SCALE_MIN, FP16_MAX).half()
        # the clamp matters: a cast to e4m3fn beyond +-448 is NaN on some backends (fp16 rounding of the scale)
        codes = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes, scale

    @staticmethod
    def dequantize(codes, params, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        # float8 has no mixed-type arithmetic: widen first
        if out is None:
            return codes.to(dtype, memory_format=torch.contiguous_format).mul_(params)
        return out.copy_(codes).mul_(params)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8 (scatter is not implemented for float8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
