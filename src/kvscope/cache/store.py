"""Slot storage for one layer's keys and values: allocated once, written in place, read back dense.

Every store has the same shape of contract: `write(slots, keys, values)` puts N new tokens per (sequence, KV head)
row into the given slots, `read(upto)` returns dense keys and values of slots [0, upto) in the compute dtype, and
`nbytes` is exactly what it allocated. Quantized stores (kvscope.cache.quant) follow the same contract.
"""

from __future__ import annotations

import torch

from kvscope.kvformats import kv_format


class DenseStore:
    """Keys and values at full precision in [batch, kv_heads, slots, head_dim] buffers."""

    def __init__(self, batch: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype, device):
        self.keys = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        index = slots[..., None].expand(*slots.shape, keys.shape[-1])
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


DENSE_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_store(kv_dtype: str | None, batch: int, heads: int, slots: int, head_dim: int, compute_dtype: torch.dtype,
               device):
    """The store for a KV format name (None = the model's own dtype)."""
    if kv_dtype is None:
        return DenseStore(batch, heads, slots, head_dim, compute_dtype, device)
    fmt = kv_format(kv_dtype)
    if not fmt.quantized:
        return DenseStore(batch, heads, slots, head_dim, DENSE_TORCH[fmt.name], device)
    from kvscope.cache.quant import quantized_store

    return quantized_store(fmt.name, batch, heads, slots, head_dim, compute_dtype, device)
