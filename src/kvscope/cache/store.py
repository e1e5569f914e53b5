"""Slot storage for one layer's keys and values: allocated once, written in place, read back dense.

Every store has the same shape of contract: `write(slots, keys, values)` puts N new tokens per (sequence, KV head)
row into the given slots, `read(upto)` returns dense keys and values of slots [0, upto) in the compute dtype, and
`nbytes` is exactly what it allocated. Quantized stores (kvscope.cache.quant) follow the same contract.
"""

from __future__ import annotations

import torch

from kvscope.cache.arena import allocate, layout_of
from kvscope.kvformats import kv_format


def slot_index(index: torch.Tensor, trailing: tuple[int, ...]) -> torch.Tensor:
    """Slots `index` [B, H, n] expanded over a tensor's `trailing` dims (after its slot dim): a gather's index."""
    return index.reshape(*index.shape, *[1] * len(trailing)).expand(*index.shape, *trailing)


def gather_slots(t: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None, dim: int = 2) -> torch.Tensor:
    """`t` [B, H, S, ...]'s slots `index` [B, H, n] along dim 2 (`dim`: the slot dim of a tensor with more leading
    dims, [L, B, H, S, ...] with dim 3 and an index [L, B, H, n]), or `index` already expanded over t's trailing dims
    by `slot_index`, to share it among tensors of one shape, into `out` (any strides) when given. One-byte float
    types are gathered as bytes (no fp8 gather on the CPU)."""
    as_bytes = t.element_size() == 1 and t.is_floating_point()
    raw = t.view(torch.uint8) if as_bytes else t
    if index.dim() != t.dim():
        index = slot_index(index, t.shape[dim + 1:])
    elif index.shape[dim + 1:] != t.shape[dim + 1:]:  # gather would take a smaller one silently: a sub-block of a slot
        raise ValueError(f"an expanded index must be [..., n, {', '.join(map(str, t.shape[dim + 1:]))}], got "
                         f"{list(index.shape)}")
    if out is None:
        return raw.gather(dim, index).view(t.dtype)
    torch.gather(raw, dim, index, out=out.view(torch.uint8) if as_bytes else out)
    return out


class DenseStore:
    """Keys and values at full precision in [batch, kv_heads, slots, head_dim] buffers."""

    TENSORS = ("keys", "values")
    KERNEL = 0  # the fused decode attention's format id (kvscope.cache.attention_triton)

    def __init__(self, batch: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype, device,
                 tensors: dict[str, torch.Tensor] | None = None):
        from kvscope.cache.arena import TYPE_NAMES

        name = TYPE_NAMES[dtype]
        t = tensors or allocate(layout_of(name, batch, heads, slots, head_dim, dtype), device)
        self.keys, self.values = t["keys"], t["values"]

    def kernel_tensors(self) -> tuple[list[torch.Tensor], int]:
        """(the tensors the fused kernels read, in their order; `full` key-group slots, int4 only)."""
        return [self.keys, self.values], 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        index = slot_index(slots, keys.shape[3:])
        self.keys.scatter_(2, index, keys.to(self.keys.dtype))
        self.values.scatter_(2, index, values.to(self.values.dtype))

    def write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        self.keys[:, :, start:start + n].copy_(keys)
        self.values[:, :, start:start + n].copy_(values)

    def read(self, upto: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[:, :, :upto], self.values[:, :, :upto]
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        return k, v

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the store owns (for swap and byte accounting)."""
        return {"keys": self.keys, "values": self.values}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Point the store at other buffers of the same shapes (offload staging, a swapped-in arena)."""
        for name in self.TENSORS:
            setattr(self, name, tensors[name])


DENSE_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def store_class(kv_dtype: str | None, compute_dtype: torch.dtype):
    """(the store class of a KV format name (None = the model's own dtype), the dtype it is built with)."""
    if kv_dtype is None:
        return DenseStore, compute_dtype
    fmt = kv_format(kv_dtype)
    if not fmt.quantized:
        return DenseStore, DENSE_TORCH[fmt.name]
    from kvscope.cache.quant import Fp8Store, Int8Store  # the quantized stores build on this module
    from kvscope.cache.quant_int4 import Int4Store

    return {"fp8": Fp8Store, "int8": Int8Store, "int4": Int4Store}[fmt.name], compute_dtype


def make_store(kv_dtype: str | None, batch: int, heads: int, slots: int, head_dim: int, compute_dtype: torch.dtype,
               device, tensors: dict[str, torch.Tensor] | None = None):
    """The store for a KV format name (None = the model's own dtype), on `tensors` (zeroed, from an arena) when
    given, else on its own new buffers."""
    cls, dtype = store_class(kv_dtype, compute_dtype)
    return cls(batch, heads, slots, head_dim, dtype, device, tensors)


def wrap_store(kv_dtype: str | None, tensors: dict[str, torch.Tensor]):
    """A store over tensors that already hold tokens (a copy of some slots of another store): nothing is initialised,
    so `read` gives back exactly what was stored."""
    cls, _ = store_class(kv_dtype, torch.float32)
    store = cls.__new__(cls)
    store.bind(tensors)
    return store
