"""The int4 KV store (KIVI): 4-bit keys per channel in groups of slots, 4-bit values per token, a full-precision
ring of the newest tokens. Same contract as the other quantized stores (kvscope.cache.quant)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvscope.cache.arena import allocate, layout_of
from kvscope.cache.quant import FP16_MAX, INT4_SPAN_MIN, _fast, _Store
from kvscope.errors import usage
from kvscope.kvformats import INT4_FLUSH_BLOCK_BYTES, INT4_GROUP, INT4_RESIDUAL

R = INT4_RESIDUAL
FLUSH_BLOCK_BYTES = INT4_FLUSH_BLOCK_BYTES  # the planner prices it: kvscope.kvformats.flush_temporary_bytes
EMPTY = -(R + 1.0)  # value-scale marker of a slot never written (see Int4Store)


def check_int4_head_dim(head_dim: int) -> None:
    if head_dim % INT4_GROUP:
        raise usage(f"the int4 KV cache cannot pack head_dim {head_dim}: values are quantized per token in groups of "
                    f"{INT4_GROUP} channels, two 4-bit codes per byte",
                    expected=f"a head_dim that is a multiple of {INT4_GROUP}",
                    fix="--kv-dtype to int8 (or fp8), which work with any head_dim")


class Int4Store(_Store):
    """KIVI (arXiv:2402.02750): 4-bit keys per channel, 4-bit values per token, a full-precision recent window.

    Storage (allocated once; nbytes as priced by kvformats):
    - `packed` uint8 [2, B, H, S, D/2]: key codes ([0]) and value codes ([1]), channels 2j and 2j+1 in the low and
      high nibble of byte j; a value decodes as code * scale + zero.
    - `key_params` fp16 [B, H, S // 64, 2, D]: (scale, zero) per key group of 64 slots [64g, 64g + 64) and channel.
    - `tail_params` fp16 [B, H, S % 64, 2, D/64]: the last S % 64 slots do not fill a key group, so their keys are
      quantized per token like values (same bytes per token: D/16).
    - `value_params` fp16 [B, H, S, 2, D/64]: (scale, zero) per slot and group of 64 channels.
    - `residual` [2, B, H, 128, D] in the compute dtype: a ring of the most recently written tokens, kept exact.

    Slot state is encoded in the first value scale of each slot, `m = value_params[b, h, s, 0, 0]` (real scales
    are >= 0, so negative numbers are free to use; all of them are exact in fp16):
    - m >= 0: the slot's codes hold its token;
    - m == -(1 + i): the slot's token is pending in ring entry i; its codes are stale and `read` takes the ring's;
    - m == EMPTY: never written (excluded from key-group ranges; reads as finite garbage, masked out by the cache).
    No slot -> ring index is stored: a slot written again while pending simply points at its new ring entry, and the
    old entry, orphaned, is dropped when flushed. The ring position (`head`, `count`) is host-side and shared by all
    rows, since every write puts the same number of tokens into every row.

    Writes: new tokens go to the ring. When it would overflow, the oldest entries are flushed into the codes: at least
    the overflow and at least half the ring at once, so decoding pays one flush every 64 tokens, not every token;
    between 64 and 128 of the most recent tokens of each row are therefore exact. A write of more than 128 tokens
    quantizes all but its last 128 directly.

    Flushing into a key group, and slot reuse: a key group is quantized per channel over its 64 slots, and slots are
    reused after eviction, so a group keeps receiving tokens long after it was first filled. A flush re-quantizes each
    group it touches from the group's dequantized codes plus the new tokens: range = min/max per channel over the
    slots holding a token (m >= 0, which includes evicted tokens not yet overwritten: the store cannot tell them
    apart) and the flushed ones. Accuracy consequence: when that range is unchanged, re-quantization is exact (the
    old codes come back); when it changes (a new token outside it, or an extreme token replaced), every other token of
    the group is re-rounded to the new grid, adding at most half a new grid step of error each time. So error can
    build up on long-lived tokens in groups that see many replacements, bounded by the number of range changes
    (tests/cache/test_quant.py checks it stays within the int4 bound after many reuse rounds). Values are per token
    and never re-quantized.
    """

    GROUPED = True  # keys quantized per group of slots: slots cannot be moved one by one

    TENSORS = ("packed", "key_params", "tail_params", "value_params", "residual")
    KERNEL = 3
    GRAPH_SAFE = False  # the ring position (head, count) and the flush schedule live on the host

    def __init__(self, batch, heads, slots, head_dim, compute_dtype, device, tensors=None):
        check_int4_head_dim(head_dim)
        t = tensors or allocate(layout_of("int4", batch, heads, slots, head_dim, compute_dtype), device)
        self.groups = slots // INT4_GROUP
        for name in self.TENSORS:
            setattr(self, name, t[name])
        self.value_params[:, :, :, 0, 0] = EMPTY
        self.head = 0  # ring entry the next token goes to
        self.count = 0  # ring entries in use, the oldest being (head - count) % R (some may be orphaned)
        self.flushed = False  # a flush ran since offload last copied this store back (see offload_plan)

    def offload_plan(self) -> dict[str, int | None]:
        """What layer offload copies back to the CPU master after a forward: {tensor: 2 (the written slots, dim 2)
        or None (the whole tensor)}; a tensor not named is unchanged. A write puts tokens in the ring and marks their
        slots (value_params); codes and key parameters change only in a flush, after which everything is copied
        (once every 64 decode steps)."""
        if self.flushed:
            self.flushed = False
            return dict.fromkeys(self.TENSORS)
        return {"residual": None, "value_params": 2}

    def kernel_tensors(self) -> tuple[list[torch.Tensor], int]:
        return [self.packed, self.key_params, self.tail_params, self.value_params, self.residual], \
            self.groups * INT4_GROUP

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, b, h, s, half = self.packed.shape
        return b, h, s, 2 * half

    # --- reading ---------------------------------------------------------------------------------------------------
    def read(self, upto: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ran, kv = _fast(self.packed, "int4_read", self, upto, dtype, out)
        if ran:
            return kv[0, :, :, :upto], kv[1, :, :, :upto]
        kv = self._dequantize(self._decoded_slots(upto), dtype)[:, :, :, :upto]
        m = self.value_params[:, :, :upto, 0, 0]
        ring = self.residual.gather(3, _ring_index(m)[None, ..., None].expand(kv.shape))
        kv = torch.where((m < 0)[None, ..., None], ring.to(dtype), kv)
        return kv[0], kv[1]

    def _decoded_slots(self, upto: int) -> int:
        """Slots to decode for a read of [0, upto): whole key groups (their codes are viewed group by group)."""
        full = self.groups * INT4_GROUP
        return upto if upto >= full else -(-upto // INT4_GROUP) * INT4_GROUP

    def _dequantize(self, n: int, dtype: torch.dtype, lo: int = 0) -> torch.Tensor:
        """Keys and values of slots [lo, n) as stored in the codes, [2, B, H, n - lo, D] in `dtype` (ring not
        applied); `lo` below the key groups' end is a group boundary."""
        b, h, _, d = self.shape
        kg, cg = self.groups * INT4_GROUP, d // INT4_GROUP
        g0, g1 = min(lo, kg) // INT4_GROUP, min(n // INT4_GROUP, self.groups)  # the key groups in [lo, n)
        mid = max(lo, g1 * INT4_GROUP)  # keys in [lo, mid) decode by group, [mid, n) per token (the tail)
        codes = F.embedding(self.packed[:, :, :, lo:n].int(), _nibbles(dtype, self.packed.device))
        codes = codes.view(2, b, h, n - lo, d)
        out = torch.empty(2, b, h, n - lo, d, dtype=dtype, device=codes.device)
        if g1 > g0:
            kp = self.key_params[:, :, g0:g1, :, None]  # [B, H, g, 2, 1, D]
            shape = (b, h, g1 - g0, INT4_GROUP, d)
            torch.addcmul(kp[:, :, :, 1], codes[0, :, :, :mid - lo].view(shape), kp[:, :, :, 0],
                          out=out[0, :, :, :mid - lo].view(shape))
        if n > mid:
            tp = self.tail_params[:, :, mid - kg:n - kg, :, :, None]  # [B, H, t, 2, cg, 1]
            shape = (b, h, n - mid, cg, INT4_GROUP)
            torch.addcmul(tp[:, :, :, 1], codes[0, :, :, mid - lo:].view(shape), tp[:, :, :, 0],
                          out=out[0, :, :, mid - lo:].view(shape))
        vp = self.value_params[:, :, lo:n, :, :, None]  # [B, H, n, 2, cg, 1]
        torch.addcmul(vp[:, :, :, 1], codes[1].view(b, h, n - lo, cg, INT4_GROUP), vp[:, :, :, 0],
                      out=out[1].view(b, h, n - lo, cg, INT4_GROUP))
        return out

    # --- writing ---------------------------------------------------------------------------------------------------
    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._write(slots, 0, keys, values)

    def write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._write(None, start, keys, values)

    def _write(self, slots: torch.Tensor | None, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Into `slots` [B, H, N], or, when None, into [start, start + N)."""
        b, h, n, _ = keys.shape
        d = max(0, n - R)  # the first d tokens are quantized at once, the last n - d go to the ring
        overflow = self.count + n - d - R
        if overflow > 0 or d:
            flush = min(self.count, max(overflow, R // 2)) if overflow > 0 else 0
            direct = slots[..., :d] if slots is not None else torch.arange(start, start + d, device=keys.device)
            self._flush(flush, direct.expand(b, h, d), keys[:, :, :d], values[:, :, :d])
        if d:
            slots = slots[..., d:] if slots is not None else None
            keys, values = keys[:, :, d:], values[:, :, d:]
        self._to_ring(slots, start + d, keys, values)

    def _to_ring(self, slots, start: int, keys, values) -> None:
        """Ring entries head, head + 1, ... (mod R) take the tokens; their slots are marked pending there."""
        n = keys.shape[2]
        if not _fast(self.packed, "int4_ring_write", self, slots, start, keys, values)[0]:
            self._to_ring_eager(slots, start, keys, values)
        self.head = (self.head + n) % R
        self.count += n

    def _to_ring_eager(self, slots, start: int, keys, values) -> None:
        n = keys.shape[2]
        first = min(n, R - self.head)
        self.residual[0, :, :, self.head:self.head + first].copy_(keys[:, :, :first])
        self.residual[1, :, :, self.head:self.head + first].copy_(values[:, :, :first])
        if n > first:  # wrapped around
            self.residual[0, :, :, :n - first].copy_(keys[:, :, first:])
            self.residual[1, :, :, :n - first].copy_(values[:, :, first:])
        markers = _ring_markers(self.value_params.device)[self.head:self.head + n]
        if slots is None:
            self.value_params[:, :, start:start + n, 0, 0].copy_(markers.expand(keys.shape[:3]))
        else:
            self.value_params[:, :, :, 0, 0].scatter_(2, slots, markers.expand(slots.shape))

    def _flush(self, flush: int, slots, keys, values) -> None:
        """Quantize the `flush` oldest ring entries into their slots, and the given tokens into theirs.

        Invariant kept: afterwards every touched slot has m >= 0 and its codes are its token's; every key group
        holding a touched slot is re-quantized over the slots that hold a token; nothing else changes.

        Only the span of slots the flush touches is decoded and quantized again (whole key groups), a block of rows
        at a time, so its temporaries stay under about 3 x FLUSH_BLOCK_BYTES at any batch and cache size; decoding
        the whole store each time took [2, B, H, S, D] fp32 copies (H200, llama-3.1-8b shape, 658 x 4112 tokens:
        an OOM asking for 10.3 GiB) and time in proportion to the cache, not to the tokens flushed.
        """
        m = self.value_params[:, :, :, 0, 0].float()  # [B, H, S]
        oldest = (self.head - self.count) % R
        pending = (m < 0) & (m > EMPTY)
        flushed = pending & (torch.remainder(-1 - m - oldest, R) < flush)  # ring age < flush
        touched = flushed.scatter(2, slots, True) if keys.shape[2] else flushed
        lo, hi = self._span(touched)
        b, h, _, d = self.shape
        rows = max(1, FLUSH_BLOCK_BYTES // (2 * h * max(1, hi - lo) * d * 4))
        span = slice(lo, hi)
        m, flushed, touched = m[..., span], flushed[..., span], touched[..., span]
        for r in range(0, b if hi > lo else 0, rows):
            part = slice(r, r + rows)
            self._rows(part)._flush_span(lo, hi, m[part], flushed[part], touched[part], slots[part], keys[part],
                                         values[part])
        self.count -= flush
        self.flushed = True

    def _span(self, touched: torch.Tensor) -> tuple[int, int]:
        """[lo, hi): the slots a flush touches in any row, widened to whole key groups (one host sync)."""
        columns = touched.any(1).any(0)  # [S]
        index = torch.arange(columns.shape[0], device=columns.device)
        first, last = torch.stack((torch.where(columns, index, columns.shape[0]).amin(),
                                   torch.where(columns, index, -1).amax())).tolist()
        if last < 0:
            return 0, 0
        kg = self.groups * INT4_GROUP
        lo = first // INT4_GROUP * INT4_GROUP if first < kg else first
        hi = min(kg, -(-(last + 1) // INT4_GROUP) * INT4_GROUP) if last < kg else last + 1
        return lo, hi

    def _rows(self, part: slice) -> Int4Store:
        """A view of rows `part` of this store: its tensors are views of this store's, its ring position the same."""
        view = object.__new__(Int4Store)
        view.groups, view.head, view.count = self.groups, self.head, self.count
        view.packed, view.residual = self.packed[:, part], self.residual[:, part]
        view.key_params, view.tail_params = self.key_params[part], self.tail_params[part]
        view.value_params = self.value_params[part]
        return view

    def _flush_span(self, lo: int, hi: int, m, flushed, touched, slots, keys, values) -> None:
        """The flush of slots [lo, hi) (whole key groups below the groups' end); `m`, `flushed` and `touched` are of
        those slots."""
        x = self._dequantize(hi, torch.float32, lo)  # [2, B, H, hi - lo, D]
        ring = self.residual.gather(3, _ring_index(m)[None, ..., None].expand(x.shape)).float()
        x = torch.where(flushed[None, ..., None], ring, x)
        del ring
        if keys.shape[2]:
            x.scatter_(3, (slots - lo)[None, ..., None].expand(2, *keys.shape), torch.stack((keys, values)).float())
        holds = (m >= 0) | touched  # slots whose token counts for its key group's range
        self._quantize_values(x[1], touched, lo)
        self._quantize_keys(x[0], touched, holds, lo)

    def _quantize_values(self, v: torch.Tensor, touched: torch.Tensor, lo: int) -> None:
        b, h, s, d = v.shape
        codes, params = _int4(v.view(b, h, s, d // INT4_GROUP, INT4_GROUP), dim=-1)
        _update(self.packed[1, :, :, lo:lo + s], _pack(codes.view(b, h, s, d)), touched[..., None])
        _update(self.value_params[:, :, lo:lo + s], params.transpose(-1, -2), touched[..., None, None])

    def _quantize_keys(self, k: torch.Tensor, touched: torch.Tensor, holds: torch.Tensor, lo: int) -> None:
        """Keys of slots [lo, lo + s): whole key groups, then per token in the tail."""
        b, h, s, d = k.shape
        kg = self.groups * INT4_GROUP
        mid = min(max(lo, kg), lo + s) - lo  # k[:, :, :mid] are whole key groups
        if mid:
            g0, g = lo // INT4_GROUP, mid // INT4_GROUP
            grouped = k[:, :, :mid].view(b, h, g, INT4_GROUP, d)
            codes, params = _int4(grouped, dim=3, holds=holds[:, :, :mid].view(b, h, g, INT4_GROUP, 1))
            regroup = touched[:, :, :mid].view(b, h, g, INT4_GROUP).any(-1)  # [B, H, g]
            _update(self.key_params[:, :, g0:g0 + g], params, regroup[..., None, None])  # params [B, H, g, 2, D]
            in_regroup = regroup[..., None].expand(b, h, g, INT4_GROUP).reshape(b, h, mid, 1)
            _update(self.packed[0, :, :, lo:lo + mid], _pack(codes.view(b, h, mid, d)), in_regroup)
        if s > mid:
            t0 = lo + mid - kg  # the tail's first slot, as an index of tail_params
            tail = k[:, :, mid:]
            codes, params = _int4(tail.reshape(b, h, s - mid, d // INT4_GROUP, INT4_GROUP), dim=-1)
            _update(self.packed[0, :, :, lo + mid:lo + s], _pack(codes.view(b, h, s - mid, d)),
                    touched[:, :, mid:, None])
            _update(self.tail_params[:, :, t0:t0 + s - mid], params.transpose(-1, -2), touched[:, :, mid:, None, None])


def _int4(x: torch.Tensor, dim: int, holds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit asymmetric codes of fp32 `x` over `dim` (uint8, x's shape) and params (scale, zero) stacked at `dim`.

    `holds` (broadcast to x) limits the range to some elements; the others are clamped into it.
    """
    if holds is None:
        lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    else:
        lo = torch.where(holds, x, torch.inf).amin(dim, keepdim=True)
        hi = torch.where(holds, x, -torch.inf).amax(dim, keepdim=True)
    scale = (hi - lo).clamp_(INT4_SPAN_MIN, FP16_MAX).div_(15)  # a range with no element: garbage, never used
    params = torch.cat((scale, lo), dim).clamp_(-FP16_MAX, FP16_MAX).half()
    s, z = params.narrow(dim, 0, 1), params.narrow(dim, 1, 1)
    codes = (x - z).div_(s).round_().clamp_(0, 15).to(torch.uint8)
    return codes, params


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] codes 0..15 -> [..., D/2] bytes: channel 2j in the low nibble, 2j + 1 in the high one."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _update(target: torch.Tensor, new: torch.Tensor, where: torch.Tensor) -> None:
    target.copy_(torch.where(where, new, target))


def _ring_index(m: torch.Tensor) -> torch.Tensor:
    """Ring entry of each slot from its marker (clamped into range for the slots that are not pending)."""
    return (-1 - m).clamp_(0, R - 1).long()


_NIBBLES: dict = {}
_MARKERS: dict = {}


def _nibbles(dtype: torch.dtype, device) -> torch.Tensor:
    """[256, 2] table: byte -> (low nibble, high nibble) in `dtype`; unpacking is then one embedding lookup."""
    key = (dtype, str(device))
    if key not in _NIBBLES:
        b = torch.arange(256, device=device)
        _NIBBLES[key] = torch.stack((b & 15, b >> 4), -1).to(dtype)
    return _NIBBLES[key]


def _ring_markers(device) -> torch.Tensor:
    """fp16 [2R]: entry j is the marker of ring entry j % R, so [head, head + n) never needs a wrap."""
    key = str(device)
    if key not in _MARKERS:
        _MARKERS[key] = (-1.0 - torch.arange(2 * R, device=device) % R).half()
    return _MARKERS[key]
