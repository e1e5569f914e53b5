"""One allocation for a whole cache: every layer's storage and slot state are views into a single buffer.

Why: allocated lazily, layer by layer, between the prefill's activations, the stores end up interleaved with
temporaries in the caching allocator's segments, and the freed temporaries leave holes no later request fits (on an
H200 a run failed with 78 GiB of KV allocated and 39.9 GiB reserved but unallocated). Allocated once, before any
activation exists, the cache is one segment that nothing can fragment, and its size is known to the byte
(`Arena.plan_bytes`, which the planner mirrors).

Each view starts at a multiple of `ALIGN` bytes (wide vector loads, and every dtype's alignment). The buffer is
zeroed once: stores and slot state then only write what is not zero.
"""

from __future__ import annotations

import torch

from kvscope.kvformats import ALIGN, ELEMENT_BYTES, READ_BUFFER, Layout, layout_bytes, store_layout

TORCH_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
               "uint8": torch.uint8, "bool": torch.bool, "int64": torch.long}
TYPE_NAMES = {v: k for k, v in TORCH_TYPES.items()}


class Arena:
    """Allocates the tensors of `specs` (kvscope.kvformats.cache_layout) as views of one zeroed uint8 buffer on
    `device`; `pin` for pinned host memory."""

    def __init__(self, specs: Layout, device, pin: bool = False, source: torch.Tensor | None = None):
        self.specs = specs
        total = layout_bytes(specs)
        make = torch.zeros if source is None else torch.empty
        self.buffer = make(total, dtype=torch.uint8, device=device, pin_memory=pin)
        self.views: dict[str, torch.Tensor] = {}
        offset, kept = 0, total
        for name, shape, kind in specs:
            n = ELEMENT_BYTES[kind]
            for dim in shape:
                n *= dim
            if name == READ_BUFFER:  # scratch of every read, never read back: the end of what a swap copies
                kept = offset
            self.views[name] = self.buffer[offset:offset + n].view(TORCH_TYPES[kind]).view(shape)
            offset += -(-n // ALIGN) * ALIGN
        self.swap_bytes = kept  # what a swap copies: everything but the read buffer, which comes last in a layout
        if source is not None:  # a copy of another arena's bytes (a swap)
            self.buffer[:kept].copy_(source[:kept], non_blocking=True)

    def moved(self, device, pin: bool = False) -> Arena:
        """The same tensors, bit for bit, in a new allocation on `device` (pinned host memory with `pin`); a quantized
        cache's read buffer (kvscope.kvformats.READ_BUFFER), which every read overwrites, is not copied."""
        return Arena(self.specs, device, pin=pin, source=self.buffer)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def stacked(self, name: str, first: int, count: int) -> torch.Tensor:
        """The views `{i}.{name}` of layers first .. first + count - 1 as one tensor [count, *shape]: every layer's
        views are laid out alike (kvscope.kvformats.cache_layout), so one name's views are evenly spaced."""
        t = self.views[f"{first}.{name}"]
        if count == 1:
            return t[None]
        step = self.views[f"{first + 1}.{name}"].data_ptr() - t.data_ptr()  # a multiple of ALIGN bytes
        last = self.views[f"{first + count - 1}.{name}"]
        if last.data_ptr() != t.data_ptr() + (count - 1) * step or last.shape != t.shape:
            raise ValueError(f"the views {first}.{name} .. {first + count - 1}.{name} are not evenly spaced")
        return t.as_strided((count, *t.shape), (step // t.element_size(), *t.stride()))

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        """The views whose names start with `prefix`, with the prefix removed."""
        return {name[len(prefix):]: t for name, t in self.views.items() if name.startswith(prefix)}


def allocate(layout: Layout, device) -> dict[str, torch.Tensor]:
    """Zeroed tensors of one store's `layout` (kvscope.kvformats.store_layout), when no arena provides them."""
    return {name: torch.zeros(shape, dtype=TORCH_TYPES[kind], device=device) for name, shape, kind in layout}


def layout_of(kv: str, batch: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype) -> Layout:
    """One store's layout in format `kv` for a torch compute `dtype`."""
    return store_layout(kv, batch, heads, slots, head_dim, TYPE_NAMES[dtype])
