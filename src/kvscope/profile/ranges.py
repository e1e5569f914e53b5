"""Named ranges in the profile: one per decoder layer forward and one per generation phase.

Each range is a `torch.profiler.record_function` (it shows in the Chrome trace and in `key_averages()`), and with
`nvtx=True` also an NVTX range, which Nsight Systems shows on the CPU thread's NVTX row above the kernels it launched.
Layer ranges come from forward pre/post hooks on every decoder layer; `layer_ranges` removes them on exit, so the model
is left as it was found, also when the workload raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.autograd.profiler import record_function

from kvscope import _compat

PREFIX = "kvscope/"
LAYER_PREFIX = PREFIX + "layer_"
PHASES = ("prefill", "decode")


def layer_range_name(index: int) -> str:
    return f"{LAYER_PREFIX}{index}"


def phase_range_name(phase: str) -> str:
    return PREFIX + phase


class Range:
    """An open named range; `close()` ends it (idempotent)."""

    def __init__(self, name: str, nvtx: bool = False) -> None:
        self.name = name
        self.nvtx = nvtx
        self._record = record_function(name)
        self._record.__enter__()
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        self._open = True

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._record.__exit__(None, None, None)


@contextmanager
def layer_ranges(model, nvtx: bool = False) -> Iterator[int]:
    """Wrap every decoder layer's forward in a `kvscope/layer_<i>` range while the block runs; yields the layer count.

    >>> with layer_ranges(model):                  # doctest: +SKIP
    ...     model.generate(ids, max_new_tokens=4)
    """
    layers = _compat.decoder_layers(model)
    handles = []
    try:
        for i, layer in enumerate(layers):
            pre, post = _layer_hooks(layer_range_name(i), nvtx)
            handles.append(layer.register_forward_pre_hook(pre))
            handles.append(layer.register_forward_hook(post, always_call=True))
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()


def _layer_hooks(name: str, nvtx: bool) -> tuple[Callable, Callable]:
    open_ranges: list[Range] = []  # a stack, so a (hypothetical) re-entrant forward still pairs begin and end

    def pre(module, args):
        open_ranges.append(Range(name, nvtx))

    def post(module, args, output):
        if open_ranges:
            open_ranges.pop().close()

    return pre, post


class PhaseMarker:
    """The current generation phase as an open range: `enter("prefill")`, `enter("decode")`, `close()`. The profiler
    enters the phases that `kvscope.monitor.Phases` starts.

    Entering the phase already open does nothing; entering another closes the current one first. `sync` runs before a
    range closes, so on CUDA the range also covers the kernels its phase queued.
    """

    def __init__(self, nvtx: bool = False, sync: Callable[[], None] | None = None) -> None:
        self.nvtx = nvtx
        self.sync = sync or (lambda: None)
        self.phase: str | None = None
        self._range: Range | None = None

    def enter(self, phase: str) -> None:
        if phase == self.phase:
            return
        self.close()
        self.phase = phase
        self._range = Range(phase_range_name(phase), self.nvtx)

    def close(self) -> None:
        if self._range is not None:
            self.sync()
            self._range.close()
        self._range = None
        self.phase = None
