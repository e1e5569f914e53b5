"""Layer offload and session swap for `BudgetedCache`.

Offload (`offload=True`): every layer's KV storage lives in pinned CPU memory; the GPU holds two staging buffers.
While layer i computes on the current stream, layer i+1's storage is copied into the other staging buffer on a side
stream, so at most two layers' KV are resident at any time. New tokens are written on the GPU and copied back to the
CPU master on the side stream (only the slots that changed). Copies and compute are ordered with CUDA events:
  - a layer's compute waits for the event recorded after its prefetch;
  - a prefetch into a staging buffer waits for the write-back of the layer that used that buffer before.

Swap (`swap_out()` / `swap_in()`): move a whole cache (storage and per-slot state) to CPU memory and back,
bit-exactly, e.g. for an idle chat session. Without CUDA there is nothing to move: swap is a no-op that says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvscope.errors import usage


def require_cuda_for_offload(device) -> None:
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        raise usage("KV offload needs a CUDA device (it moves KV between GPU and pinned CPU memory), but the model "
                    f"runs on {device}", expected="a model on cuda", fix="drop --offload (on CPU the KV already lives "
                    "in system memory) or run on a GPU")


def _tensors(store) -> dict[str, torch.Tensor]:
    return store.tensors()


def _set_tensors(store, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        setattr(store, name, t)


class LayerOffloader:
    """Pinned CPU masters for every layer, two GPU staging buffers, prefetch on a side stream."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.masters: dict[int, dict[str, torch.Tensor]] = {}
        self.staging: list[dict[str, torch.Tensor]] = []
        self.holder: list[int | None] = [None, None]  # which layer each staging buffer holds
        self.ready: dict[int, torch.cuda.Event] = {}
        self.released: list[torch.cuda.Event | None] = [None, None]
        self.stream: torch.cuda.Stream | None = None

    # called once per layer, when the layer allocates its store on the GPU
    def adopt(self, index: int, store) -> None:
        gpu = _tensors(store)
        if not self.staging:
            self.stream = torch.cuda.Stream(device=next(iter(gpu.values())).device)
            self.staging = [gpu, {k: torch.empty_like(v) for k, v in gpu.items()}]
            self.holder = [index, None]
        self.masters[index] = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in gpu.items()}
        for k, v in gpu.items():
            self.masters[index][k].copy_(v)
        if self.holder[0] != index:
            del gpu  # the layer's own GPU tensors are dropped: only the two staging buffers stay resident
        _set_tensors(store, self.masters[index])

    def bytes_resident(self) -> int:
        return sum(t.nbytes for buf in self.staging for t in buf.values())

    def _slot(self, index: int) -> int:
        return index % 2

    def prefetch(self, index: int) -> None:
        """Start copying layer `index` into its staging buffer on the side stream (no wait on the host)."""
        if index not in self.masters:
            return
        s = self._slot(index)
        if self.holder[s] == index:
            return
        with torch.cuda.stream(self.stream):
            if self.released[s] is not None:
                self.stream.wait_event(self.released[s])
            for k, dst in self.staging[s].items():
                dst.copy_(self.masters[index][k], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.holder[s] = index
        self.ready[index] = event

    def activate(self, index: int, store) -> None:
        """Point the layer's store at its staging buffer, ready for compute; prefetch the next layer."""
        self.prefetch(index)
        s = self._slot(index)
        if index in self.ready:
            torch.cuda.current_stream().wait_event(self.ready.pop(index))
        _set_tensors(store, self.staging[s])
        nxt = (index + 1) % self.num_layers
        if self._slot(nxt) != s:  # with an odd number of layers, layer 0 follows the last one in the same buffer:
            self.prefetch(nxt)  # it is fetched at its own activate(), after this layer's write-back released it

    def write_back(self, index: int, store, written: list) -> None:
        """Copy the slots this layer just wrote (spans or scattered slot tensors) back to its CPU master, then point
        the store at the master again."""
        s = self._slot(index)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(done)
            # {tensor: None = copy it whole, 2 = copy the written slots (dim 2)}; a tensor not named is unchanged
            plan = store.offload_plan() if hasattr(store, "offload_plan") else dict.fromkeys(self.staging[s], 2)
            for k, src in self.staging[s].items():
                if k not in plan:
                    continue
                dst = self.masters[index][k]
                if plan[k] is None:
                    dst.copy_(src, non_blocking=True)
                    continue
                for w in written:
                    if isinstance(w, tuple):
                        dst[:, :, w[0]:w[1]].copy_(src[:, :, w[0]:w[1]], non_blocking=True)
                        continue
                    # scattered slots differ per row: gather on the GPU, copy back and scatter (a few tokens)
                    idx = w.reshape(*w.shape, *([1] * (src.dim() - 3))).expand(*w.shape, *src.shape[3:])
                    dst.scatter_(2, idx.cpu(), src.gather(2, idx).cpu())
            released = torch.cuda.Event()
            released.record(self.stream)
        self.released[s] = released
        _set_tensors(store, self.masters[index])


@dataclass
class SwapReport:
    direction: str
    bytes: int
    seconds: float
    note: str | None = None

    @property
    def gb_per_second(self) -> float | None:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 and self.bytes else None


def swap(cache, direction: str) -> SwapReport:
    first = next((l for l in cache.layers if l.is_initialized), None)
    if first is None:
        return SwapReport(direction, 0, 0.0, "the cache is empty: nothing to move")
    if not torch.cuda.is_available():
        return SwapReport(direction, 0, 0.0, "no CUDA device: the cache already lives in CPU memory, swap is a no-op")
    settings = cache.settings
    if settings.offloader is not None:
        raise usage("swap of an offloaded cache is not supported (its KV is already in CPU memory)", fix="offload")
    target = torch.device("cpu" if direction == "out" else cache.home_device)
    if torch.device(first.device).type == target.type:
        return SwapReport(direction, 0, 0.0, f"already on {target}")
    torch.cuda.synchronize()
    start = time.perf_counter()
    # the allocation moves as one copy (all but a quantized cache's read buffer, scratch); the captured decode steps
    # point at the old one and are dropped
    settings.arena = settings.arena.moved(target, pin=direction == "out")
    settings.queue_ptr = settings.arena.views["queue_ptr"]
    cache.decode_graphs.clear()
    for layer in cache.layers:
        if layer.is_initialized:
            layer.rebind(settings.arena.take(f"{layer.index}."))
            layer.counters = layer.counters.moved_to(target)
    torch.cuda.synchronize()
    return SwapReport(direction, settings.arena.swap_bytes, time.perf_counter() - start)
