"""The three ways kvscope's runtime runs a decode step, behind one interface: `logits = decoder.step(ids)`.

- `ForwardDecoder`: the model's own forward (any model, any cache): the reference.
- `StaticDecoder`: kvscope's step (kvscope.runtime.step) run as is: fewer launches, no host reads, a `BudgetedCache`.
- `GraphDecoder` (CUDA): the same step captured once in a CUDA graph and replayed, with eviction and free-slot
  refills as two more captured graphs; the host only counts, so a step costs one replay.

The static decoders keep host-side counters exactly as the eager path does (`upper`: the most tokens a row may hold;
`taken`: queue entries used) and evict at the same moments (after the insert that takes a row over its budget), so
all three keep the same tokens. `make_decoder` picks the fastest that can run and says why when it cannot.
"""

from __future__ import annotations

import os
import warnings

import torch

from kvscope import _compat
from kvscope.cache import static
from kvscope.cache.layer import CacheFullError
from kvscope.runtime.step import DecodeStep

MODES = ("auto", "graph", "static", "forward")
_WARNED: set[str] = set()


class ForwardDecoder:
    """Decode through `model(...)`: the model's forward with the cache's hooks."""

    def __init__(self, model, cache, positions: torch.Tensor, mask: torch.Tensor | None):
        self.model, self.cache, self.pos, self.mask = model, cache, positions, mask
        self.key = _compat.cache_keyword(model)
        self.why = ""

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=ids[:, None], attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         logits_to_keep=1, **{self.key: self.cache})
        self.pos = self.pos + 1
        return out.logits[:, -1]

    def finish(self) -> None:
        pass


def _refill_all(layers, settings) -> None:
    for layer in layers:
        static.refill(layer)
    settings.queue_ptr.zero_()


def _evict_all(layers, settings) -> None:
    for layer in layers:
        static.evict(layer)
    settings.queue_ptr.zero_()


class StaticDecoder:
    """kvscope's decode step, run eagerly; the base of `GraphDecoder`."""

    def __init__(self, weights, cache, positions: torch.Tensor):
        self.cache = cache
        self.layers = list(cache.layers)
        self.settings = cache.settings
        for layer in self.layers:  # each step then reads budget + 1 slots, not budget + chunk (static.compact)
            static.compact(layer)
        self.run = self._stepper(weights, cache, positions)
        self.run.positions.copy_(positions[:, 0])
        first = self.layers[0]
        self.queue_len = first.queue.shape[-1]
        self.upper = first.upper
        self.taken = self.queue_len  # forces a refill before the first step: the queue is built from the slot state
        self.steps = 0
        self.evicted = False
        self.why = ""

    def _stepper(self, weights, cache, positions):
        return DecodeStep(weights, cache, positions.shape[0], positions.device)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if self.taken == self.queue_len:
            self._refill()
            self.taken = 0
        if not s.policy.evicts and self.upper + 1 > s.budget_tokens:
            self._check_room()
        self.run.tokens.copy_(ids)
        logits = self._step()
        self.taken += 1
        self.upper += 1
        self.steps += 1
        if s.policy.evicts and self.upper > s.budget_tokens:
            self._evict()
            self.evicted = True
            self.taken = 0
            self.upper = s.budget_tokens - s.evict_batch + 1
        return logits

    def _check_room(self) -> None:
        held = self.cache.held_tokens()
        self.upper = held
        if held + 1 > self.settings.budget_tokens:
            self.finish()
            raise CacheFullError(f"the sequence needs {held + 1} KV tokens but the budget is "
                                 f"{self.settings.budget_tokens} (policy 'full' never evicts); change --budget or "
                                 "pick an evicting policy")

    def _step(self) -> torch.Tensor:
        return self.run()

    def _refill(self) -> None:
        _refill_all(self.layers, self.settings)

    def _evict(self) -> None:
        _evict_all(self.layers, self.settings)

    def finish(self) -> None:
        """Hand the cache back to the eager path with its host-side counters up to date."""
        for layer in self.layers:
            layer.advanced(self.steps, self.evicted)
            layer.upper = self.upper
        self.steps = 0


class _Captured:
    """A function run eagerly the first time (compiling kernels, creating library handles), captured in a CUDA graph
    the second time, replayed after. Its output tensor is the same buffer at every replay."""

    def __init__(self, fn, pool, stream, generators=()):
        self.fn, self.pool, self.stream, self.generators = fn, pool, stream, generators
        self.graph = None
        self.out = None
        self.warm = False
        self.broken = False  # a capture failed: run eagerly from now on

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.broken:
            return self.fn()
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        if not self.warm:
            with torch.cuda.stream(self.stream):
                out = self.fn()
            current.wait_stream(self.stream)
            self.warm = True
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            for g in self.generators:
                graph.register_generator_state(g)
            # the capture API itself, not torch.cuda.graph(): that one also synchronizes, runs the cycle collector and
            # empties the allocator's cache (about 0.1 s), which a capture in the middle of a generation cannot afford
            with torch.cuda.stream(self.stream):
                # thread_local: the monitor's sampling thread may call CUDA while this thread captures
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    self.out = self.fn()
                finally:
                    graph.capture_end()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a capture that fails falls back to eager, once, with the reason
            self.broken, self.out = True, None
            current.wait_stream(self.stream)
            _warn_once(f"kvscope: decoding without CUDA graphs: the capture failed ({type(exc).__name__}: {exc})")
            return self.fn()  # a failed capture ran nothing: this step runs now
        current.wait_stream(self.stream)
        self.graph = graph
        graph.replay()
        return self.out


class GraphDecoder(StaticDecoder):
    """`StaticDecoder` with its step, eviction and refill captured in CUDA graphs (one memory pool for the three).

    The graphs belong to the cache (`cache.decode_graphs`, keyed by batch): a later generation with the same cache (a
    chat turn, a benchmark repeat) replays them without capturing again; a swap drops them (the cache moved). What
    they capture refers to the cache's layers and settings, never to the cache, so `del cache` still frees it."""

    def _stepper(self, weights, cache, positions):
        key = positions.shape[0]
        if cache.decode_graphs.get(key, {}).get("version") != cache.settings.version:  # new, or its cache moved
            layers, settings = list(cache.layers), cache.settings
            run = DecodeStep(weights, cache, key, positions.device)
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(device=positions.device)
            generators = [g for g in [getattr(settings.policy, "_generator", None)] if g is not None]
            cache.decode_graphs[key] = {
                "version": settings.version, "run": run, "step": _Captured(run, pool, stream, generators),
                "evict": _Captured(lambda: _evict_all(layers, settings), pool, stream),
                "refill": _Captured(lambda: _refill_all(layers, settings), pool, stream)}
        self.graphs = cache.decode_graphs[key]
        return self.graphs["run"]

    def _step(self) -> torch.Tensor:
        return self.graphs["step"]()

    def _refill(self) -> None:
        self.graphs["refill"]()

    def _evict(self) -> None:
        self.graphs["evict"]()


def why_not_static(model, cache) -> tuple[object, str]:
    """(the model's decode weights, "") when kvscope's own step can decode with `cache`, else (None, the reason)."""
    if not hasattr(cache, "settings") or not cache.layers[0].is_initialized:
        return None, "the cache is not a BudgetedCache"
    s = cache.settings
    if s.offloader is not None:
        return None, "the cache offloads layers to the CPU (its stores move at every layer)"
    if s.collector is not None:
        return None, "an eviction collector reads every eviction on the host"
    if not getattr(cache.layers[0].store, "GRAPH_SAFE", True):
        return None, f"the {s.kv_dtype} store keeps its recent-token ring position on the host"
    if _compat.tensor_parallel_degree(model) > 1:
        return None, "the model is split over ranks (tensor parallel): kvscope's own step has no collectives"
    weights = _compat.decode_weights(model)
    if weights is None:
        return None, "the model is not a Llama-architecture causal LM"
    return weights, ""


def make_decoder(model, cache, positions: torch.Tensor, mask: torch.Tensor | None, mode: str = "auto"):
    """The decoder for this generation. `mode`: auto (graphs on CUDA when they can run, the model's forward
    elsewhere), graph, static, forward. KVSCOPE_DECODE overrides auto."""
    if mode not in MODES:
        from kvscope.errors import usage

        raise usage(f"unknown decode mode {mode!r}", expected=" or ".join(MODES), fix="decode")
    if mode == "auto":
        mode = os.environ.get("KVSCOPE_DECODE", "auto")
    cuda = positions.device.type == "cuda"
    if mode == "forward" or (mode == "auto" and not cuda):
        return ForwardDecoder(model, cache, positions, mask)
    weights, why = why_not_static(model, cache)
    if weights is None:
        _warn_once(f"kvscope: decoding through the model's forward: {why}")
        return ForwardDecoder(model, cache, positions, mask)
    if mode == "static" or not cuda:
        return StaticDecoder(weights, cache, positions)
    generators = [g for g in [getattr(cache.settings.policy, "_generator", None)] if g is not None]
    if generators and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        _warn_once("kvscope: decoding without CUDA graphs: this torch cannot capture the random policy's generator")
        return StaticDecoder(weights, cache, positions)
    return GraphDecoder(weights, cache, positions)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
