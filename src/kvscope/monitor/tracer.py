"""Exact live tensor bytes on any device, by watching every storage that aten ops create.

On CUDA, `torch.cuda.max_memory_allocated()` answers "how much did tensors take at the peak". The CPU has no such
counter, so this dispatch mode keeps one: each new storage adds its bytes and a finalizer subtracts them when the
storage dies. Storages that existed before the mode started (weights, an existing cache) are not counted.

>>> with LiveTensorTracker() as t:           # doctest: +SKIP
...     model.generate(ids, max_new_tokens=4)
>>> t.peak_bytes                               # doctest: +SKIP
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    """Peak and current bytes of storages created inside the `with` block."""

    def __init__(self, ignore: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}
        self._ignored = [t.untyped_storage() for t in (ignore or [])]  # kept alive so their ids stay unique
        for st in self._ignored:
            self._sizes[id(st)] = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> LiveTensorTracker:
        """A tracker that does not count the model's own parameters and buffers (nor views of them)."""
        return cls(ignore=[*model.parameters(), *model.buffers()])

    def _released(self, key: int, size: int) -> None:
        self.live_bytes -= size
        self._sizes.pop(key, None)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._sizes:
            return
        size = st.nbytes()
        self._sizes[key] = size
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(st, self._released, key, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
