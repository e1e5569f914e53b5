"""int4 weights at prefill: a product of many rows runs on the weight dequantized to bf16, not on the packed weight.

torchao's int4 weight-only format (tinygemm's tile-packed layout, `Int4TilePackedTo4dTensor`) multiplies with
`aten._weight_int4pack_mm`, a kernel made for a few rows: on the H200 (llama-3.1-8b shape, batches of 8 x 4096
tokens) an int4 prefill ran at 2,045 tok/s against 31,046 for bf16 weights (docs/benchmarks.md, weights-cuda). A
product of `INT4_DEQUANT_TOKENS` rows or more therefore unpacks the layer's weight to bf16 (a few elementwise kernels
over out x in elements) and multiplies with cuBLAS; fewer rows (decode) keep the packed kernel. The unpacked weight
is a temporary of that product (kvscope.weightformats prices it).

The tile layout is tinygemm's, undocumented: within each block of 8 output rows x 128 input columns, 1,024 4-bit
codes in a fixed order. That order is read from the packing kernel itself, once per device (`slot_order`: pack
matrices whose codes are the digits of each element's position, and read the positions back), so nothing here
hard-codes it. Each layer shape's first large product is checked against the packed kernel on a few rows
(`check`); a mismatch or an error turns the path off for the process, with one warning, and every product runs on
the packed weight as before.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from kvscope.weightformats import INT4_DEQUANT_TOKENS

BLOCK_ROWS, BLOCK_COLS = 8, 128  # tinygemm's n-tile x (inner k-tiles 8 x 16)
BLOCK = BLOCK_ROWS * BLOCK_COLS
MID = 8  # an int4 code c stands for (c - 8) * scale + zero (torchao's tinygemm zero-point domain)
CHECK_ROWS = 16
CHECK_TOLERANCE = 2e-2  # relative error of the check's product; bf16 rounding of the weight gives about 3e-3
_ORDER: dict[torch.device, torch.Tensor] = {}
_CHECKED: set[tuple] = set()
_STATE = {"off": None}  # why the path is off for this process, once it is


class Int4Linear(torch.nn.Linear):
    """A linear layer holding torchao's int4 weight: products of `INT4_DEQUANT_TOKENS` rows or more run on the weight
    unpacked to bf16, fewer on the packed weight. A layer becomes one by its class alone (`replace_linears`): its
    parameters, hooks and mode stay as they were; no state is added."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows < INT4_DEQUANT_TOKENS or not usable(self.weight):
            return F.linear(x, self.weight, self.bias)
        pre = getattr(self.weight, "act_pre_scale", None)  # as torchao's own product: bf16 in, the input's dtype out
        a = (x * pre if pre is not None else x).to(torch.bfloat16)
        return F.linear(a, dequantize(self.weight), self.bias).to(x.dtype)


def usable(weight) -> bool:
    """Whether this weight's large products may run dequantized: the path is on and its shape passed the check."""
    if _STATE["off"] is not None:
        return False
    if not _on_nvidia(weight):
        return _turn_off(f"tinygemm's layout is read on NVIDIA GPUs only, not {weight.device.type}"
                         f"{' (ROCm)' if torch.version.hip else ''}")
    try:
        key = (weight.device, tuple(weight.shape), tuple(weight.qdata.shape))
        if key in _CHECKED:
            return True
        error = check(weight)
    except torch.OutOfMemoryError:
        raise  # the product itself would need that memory too: an OOM, for the caller
    except Exception as exc:  # noqa: BLE001 - any failure: the packed kernel stays, with the reason said
        return _turn_off(f"{type(exc).__name__}: {exc}")
    if not error <= CHECK_TOLERANCE:  # NaN included
        return _turn_off(f"a {tuple(weight.shape)} product was {error:.3g} off the packed kernel's")
    _CHECKED.add(key)
    return True


def _on_nvidia(weight) -> bool:
    return weight.device.type == "cuda" and not torch.version.hip  # tinygemm's tile layout differs on ROCm


def check(weight) -> float:
    """Relative error of a product of CHECK_ROWS random rows on the dequantized weight against the packed kernel."""
    x = torch.randn(CHECK_ROWS, weight.shape[1], dtype=torch.bfloat16, device=weight.device)
    want = F.linear(x, weight).float()
    got = F.linear(x, dequantize(weight)).float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _turn_off(why: str) -> bool:
    _STATE["off"] = why
    warnings.warn(f"kvscope: int4 prefill on dequantized weights is off ({why}); every product runs on the packed "
                  "weights (correct, slower for many rows)", RuntimeWarning, stacklevel=4)
    return False


def dequantize(weight) -> torch.Tensor:
    """The bf16 [out, in] weight an `Int4TilePackedTo4dTensor` stands for. Holds 3 x out' x in' bytes at its peak
    (out', in': the padded shape): two bytes a code while the codes are unpacked and put in position order, then the
    position-ordered codes (one byte) and the bf16 result (two)."""
    packed, scale_zero = weight.qdata, weight.scale_and_zero  # [n'/8, k'/128, 32, 4] int32; [k'/g, n', 2]
    nb, kb = packed.shape[:2]
    n, k = nb * BLOCK_ROWS, kb * BLOCK_COLS
    codes = unpack(packed).index_select(-1, slot_order(packed.device))  # [nb, kb, 1024] by position in the block
    w = torch.empty(n, k, dtype=torch.bfloat16, device=packed.device)
    w.view(nb, BLOCK_ROWS, kb, BLOCK_COLS).copy_(codes.view(nb, kb, BLOCK_ROWS, BLOCK_COLS).transpose(1, 2))
    del codes
    groups = scale_zero.shape[0]
    scale, zero = scale_zero[..., 0].t()[..., None], scale_zero[..., 1].t()[..., None]  # [n', g, 1]
    grouped = w.view(n, groups, k // groups).sub_(MID)
    torch.addcmul(zero, grouped, scale, out=grouped)  # one rounding, as the kernel's fused multiply-add
    out, inp = weight.shape
    return w[:out, :inp]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[nb, kb, ...] int32 words -> [nb, kb, 1024] uint8 codes in storage order (byte j's low nibble, then high)."""
    nb, kb = packed.shape[:2]
    b = packed.contiguous().view(torch.uint8).view(nb, kb, BLOCK // 2)
    return torch.stack((b & 15, b >> 4), dim=-1).view(nb, kb, BLOCK)


def slot_order(device, pack=None) -> torch.Tensor:
    """[1024] long: for each position p = row * 128 + col of a block, the storage slot that holds its code. Read from
    the packing kernel (`pack`: [8, 64] uint8 -> packed int32, tinygemm's by default) by packing three matrices whose
    codes are the base-16 digits of each element's position."""
    device, default = torch.device(device), pack is None
    if default and device in _ORDER:
        return _ORDER[device]
    if default:
        def pack(u8):
            return torch.ops.aten._convert_weight_to_int4pack(u8, BLOCK_COLS // 16)
    position = torch.arange(BLOCK, dtype=torch.int32, device=device).view(BLOCK_ROWS, BLOCK_COLS)
    held = torch.zeros(BLOCK, dtype=torch.long, device=device)  # storage slot -> the position it holds
    for digit in range(3):  # 16**3 > 1024
        codes = (position >> (4 * digit)) & 15
        u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # torchao's packing of two codes a byte
        held += unpack(pack(u8).view(1, 1, -1)).view(-1).long() << (4 * digit)
    if not torch.equal(torch.sort(held).values, torch.arange(BLOCK, device=device)):
        raise ValueError("the int4 packing kernel's block layout is not a permutation of 8 x 128 codes")
    order = torch.empty_like(held)
    order[held] = torch.arange(BLOCK, device=device)
    if default:
        _ORDER[device] = order
    return order


def replace_linears(model, names) -> None:
    """Make the int4 layers `names` (fully qualified) of `model` `Int4Linear`s: the class changes, nothing else (the
    layers are plain `torch.nn.Linear`s: kvscope.models.quantize.targets checked them)."""
    for fqn in names:
        layer = model.get_submodule(fqn)
        if type(layer) is torch.nn.Linear:
            layer.__class__ = Int4Linear
