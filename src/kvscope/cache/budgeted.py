"""`BudgetedCache`: a transformers `Cache` that never holds more than its budget and evicts by a policy.

    cache = BudgetedCache(model, policy="snapkv", budget_tokens=512)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.stats()

How it plugs in (details in docs/cache.md): the cache hooks the model's decoder so that, only for forwards that carry
this cache, every attention layer runs kvscope's attention function. `update()` only hands the new keys over; the
attention function writes them into preallocated slots chunk by chunk, builds the layer's own mask (which slots are
valid, causal order among the new tokens, padding), computes attention without repeating KV heads, asks the policy for
the attention rows it needs, and evicts down to the budget before the next chunk. A prompt longer than `chunk_size`
is therefore processed in chunks inside each layer, and storage stays at budget + one chunk.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch

from kvscope import _compat
from kvscope.cache.layer import BudgetedLayer, CacheFullError, evicting_policies
from kvscope.cache.offload import LayerOffloader, SwapReport, require_cuda_for_offload, swap
from kvscope.cache.settings import CacheSettings
from kvscope.cache.stats import CacheStats, Collector
from kvscope.errors import usage
from kvscope.kvformats import kv_format
from kvscope.planner.sizes import format_bytes
from kvscope.planner.workload import DEFAULT_CHUNK
from kvscope.policies import get

Cache, _ = _compat.cache_base_classes()


@dataclass
class ForwardInfo:
    positions: torch.Tensor  # [B, q] true positions of this forward's tokens
    real: torch.Tensor  # [B, q] bool, False for padding
    all_real: bool = True  # no padding in this forward (known without a device read when no mask was given)


_ACTIVE: list = []  # caches whose forward is running (a stack: a forward inside a forward is allowed)


class BudgetedCache(Cache):
    """A KV cache with a hard per-layer budget and a pluggable eviction policy.

    Args:
        model: the causal LM the cache will serve (its config gives the shapes; its decoder gets kvscope's hooks).
        policy: a name from `kvscope.policies.available()` or a `Policy` instance.
        budget_tokens: tokens each layer keeps per sequence. Exactly one of this and `budget_bytes`.
        budget_bytes: bytes for the kept tokens of every layer and sequence together, split evenly across layers.
        kv_dtype: storage format (`bf16`, `fp16`, `fp32`, `fp8`, `int8`, `int4`); None keeps the model's dtype.
        chunk_size: the most tokens inserted before an eviction; storage is budget + chunk_size slots per row.
        collector: optional callable receiving an `EvictionEvent` per layer and eviction step.
        evict_batch: when a row goes over budget, evict down to `budget - evict_batch + 1` tokens, so the eviction
            work (scoring, sorting) runs once every `evict_batch` decode steps instead of every step. 1 (default)
            keeps every row exactly at its budget.
        offload: keep every layer's KV in pinned CPU memory and prefetch the next layer on a side CUDA stream, so
            at most two layers' KV are on the GPU (CUDA only; see kvscope.cache.offload).
        recall: "cpu" keeps what kvscope's chunked prefill evicts in CPU memory and, when the prompt's last chunk
            arrives, brings back the tokens its question needs (kvscope.cache.recall; attention-reading policies).
        **knobs: the policy's knobs (e.g. `sink_tokens=4` for streaming_llm).
    """

    def __init__(self, model, policy="lru", *, budget_tokens: int | None = None, budget_bytes: int | None = None,
                 kv_dtype: str | None = None, chunk_size: int = DEFAULT_CHUNK, collector: Collector | None = None,
                 evict_batch: int = 1, offload: bool = False, recall: str | None = None, **knobs):
        self.num_layers, self.query_heads, self.kv_heads, self.head_dim = _compat.attention_heads(model)
        policy = get(policy, **knobs)
        kv_dtype = kv_format(kv_dtype).name if kv_dtype is not None else None
        _check_int("chunk_size", chunk_size, "chunk_size")
        if (budget_tokens is None) == (budget_bytes is None):
            raise usage("give exactly one of budget_tokens and budget_bytes", fix="--budget")
        if budget_tokens is not None:
            _check_int("budget_tokens", budget_tokens, "--budget")
        else:
            _check_int("budget_bytes", budget_bytes, "--budget")
        self.settings = CacheSettings(policy, budget_tokens or 0, kv_dtype, chunk_size, evict_batch, collector,
                                      budget_bytes=budget_bytes)
        if budget_bytes is not None:
            self.settings.budget_tokens = self.tokens_for_bytes(budget_bytes, batch=1)
        policy.check_budget(self.budget_tokens)
        _check_int("evict_batch", evict_batch, "evict_batch")
        if self.budget_tokens - evict_batch + 1 < policy.min_budget():
            raise usage(f"evict_batch {evict_batch} would cut below the minimum of policy {policy.name!r}",
                        expected=f"budget - evict_batch + 1 >= {policy.min_budget()}", fix="evict_batch")
        from kvscope.cache.recall import check_recall

        check_recall(policy, offload, recall)
        self.settings.recall = recall
        self.home_device = next(model.parameters()).device
        if offload:
            require_cuda_for_offload(self.home_device)
            self.settings.offloader = LayerOffloader(self.num_layers)
        self.forward_info: ForwardInfo | None = None
        self.decode_graphs: dict = {}  # kvscope.runtime.decoders.GraphDecoder's captured steps, by batch size
        super().__init__(layers=[BudgetedLayer(self.settings, i, self.num_layers) for i in range(self.num_layers)])
        _compat.register_attention(budgeted_attention)
        # the model's hooks live as long as some kvscope cache does (no cycle holds this one: see settings.py)
        self._model = weakref.ref(model)
        weakref.finalize(self, _compat.hold_forward_hooks(model, _before_forward, _after_forward))

    # the settings every layer shares, read as the cache's own attributes
    policy = property(lambda self: self.settings.policy)
    budget_tokens = property(lambda self: self.settings.budget_tokens)
    budget_bytes = property(lambda self: self.settings.budget_bytes)
    kv_dtype = property(lambda self: self.settings.kv_dtype)
    chunk_size = property(lambda self: self.settings.chunk_size)
    evict_batch = property(lambda self: self.settings.evict_batch)
    collector = property(lambda self: self.settings.collector)
    offloader = property(lambda self: self.settings.offloader)

    # --- sizing ----------------------------------------------------------------------------------------------------
    def bytes_per_token(self, dense_bytes: int = 2) -> int:
        """Bytes one token costs in one layer (all KV heads), scales included: the planner's figure / layers."""
        name = self.kv_dtype or {1: "fp8", 2: "bf16", 4: "fp32"}[dense_bytes]
        return self.kv_heads * kv_format(name).bytes_per_head_token(self.head_dim, dense_bytes)

    def tokens_for_bytes(self, budget_bytes: int, batch: int, dense_bytes: int = 2) -> int:
        per_token = self.bytes_per_token(dense_bytes) * self.num_layers * batch
        tokens = budget_bytes // per_token
        if tokens < 1:
            raise usage(f"a byte budget of {budget_bytes} bytes holds no token",
                        expected=f"at least {per_token} bytes (one token in each of {self.num_layers} layers for "
                        f"{batch} sequence(s))", fix="--budget")
        return tokens

    def allocation_bytes(self, batch: int, dtype: torch.dtype, first_forward: int) -> int:
        """Bytes the one allocation of this cache takes for `batch` rows (what `allocate` would take)."""
        return self.settings.bytes_for(self.num_layers, batch, self.kv_heads, self.head_dim, dtype, first_forward)

    def allocate(self, batch: int, first_forward: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate every layer now, before any activation exists (kvscope's runtime does this before prefill;
        otherwise the first forward does it), after checking the device has room for it."""
        if self.layers[0].is_initialized or self.settings.offloader is not None:
            return
        device = torch.device(device or self.home_device)
        dtype = dtype or torch.float32
        if self.budget_bytes is not None:
            dense = torch.tensor([], dtype=dtype).element_size()
            self.settings.budget_tokens = self.tokens_for_bytes(self.budget_bytes, batch, dense)
            self.policy.check_budget(self.budget_tokens)
        need = self.allocation_bytes(batch, dtype, first_forward)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
            if need > free:
                raise usage(f"the KV cache needs {format_bytes(need)} for {batch} sequence(s) of {self.budget_tokens} "
                            f"tokens in {self.num_layers} layers, but the GPU has {format_bytes(free)} free",
                            expected=f"a budget of at most about {self.budget_tokens * free // need} tokens, or a "
                            "smaller batch", fix="budget_tokens (--budget), the batch, or kv_dtype (--kv-dtype)")
        self.settings.allocate(self.num_layers, batch, self.kv_heads, self.head_dim, dtype, device, first_forward)
        self.settings.fresh = True

    def evicting_policies(self) -> list[str]:
        return evicting_policies()

    def compress_to(self, budget_tokens: int, policy=None) -> BudgetedCache:
        """A copy of this cache evicted down to `budget_tokens` per row, as a one-chunk prefill under that budget would
        have left it (this cache is untouched): one prefill serves many budgets. With `policy` (one that reads no
        attention, whose scores come from `on_insert` alone), the copy switches to it first and rescores every stored
        token.

        >>> small = cache.compress_to(128)        # doctest: +SKIP
        """
        _check_int("budget_tokens", budget_tokens, "budget_tokens")
        graphs, self.decode_graphs = self.decode_graphs, {}  # captured graphs belong to this cache's buffers
        try:
            forked = copy.deepcopy(self)
        finally:
            self.decode_graphs = graphs
        model = self._model()
        if model is not None:
            weakref.finalize(forked, _compat.hold_forward_hooks(model, _before_forward, _after_forward))
        s = forked.settings
        if policy is not None:
            s.policy = get(policy)
            if s.policy.query_rows():
                raise usage(f"compress_to can switch only to a policy that reads no attention, not {s.policy.name!r}",
                            expected="full, sliding_window, streaming_llm, knorm or random", fix="policy")
            with torch.inference_mode():
                for layer in forked.layers:
                    if layer.is_initialized:
                        layer.rescore()
        s.policy.check_budget(budget_tokens)
        s.budget_tokens = budget_tokens
        with torch.inference_mode():
            for layer in forked.layers:
                if layer.is_initialized and s.policy.evicts:
                    layer._evict()
        return forked

    # --- forward bracketing ----------------------------------------------------------------------------------------
    def begin_forward(self, kwargs: dict, dtype: torch.dtype) -> None:
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, q = ref.shape[0], ref.shape[1]
        device = ref.device
        if self.budget_bytes is not None and not self.layers[0].is_initialized:
            dense = torch.tensor([], dtype=dtype).element_size()
            self.settings.budget_tokens = self.tokens_for_bytes(self.budget_bytes, batch, dense)
            self.policy.check_budget(self.budget_tokens)
        seen = self.get_seq_length()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(seen, seen + q, device=device)[None]
        positions = positions.to(device).expand(batch, q)
        mask = kwargs.get("attention_mask")
        all_real = True
        if mask is None:
            real = torch.ones(batch, q, dtype=torch.bool, device=device)
        elif mask.dim() == 2:
            real = mask[:, -q:].to(device=device, dtype=torch.bool)
            all_real = bool(real.all())  # one read per forward: lets a padding-free prefill skip building masks
        else:
            raise usage("BudgetedCache builds its own attention mask and cannot take a 4-D attention_mask",
                        expected="a 2-D padding mask [batch, tokens]", fix="attention_mask")
        self.forward_info = ForwardInfo(positions=positions.long(), real=real, all_real=all_real)

    # --- the recall tier (kvscope.cache.recall) --------------------------------------------------------------------
    def recall_bytes(self, prompt_tokens: int, batch: int, dtype: torch.dtype) -> int:
        """Host memory the recall tier can take for a prompt of `prompt_tokens`: every prompt token evicted once, and
        up to evict_batch - 1 tokens held before it (`_tier_tokens`)."""
        from kvscope.cache.arena import TYPE_NAMES
        from kvscope.kvformats import recall_tier_bytes

        dense = TYPE_NAMES[dtype]
        return recall_tier_bytes(self.num_layers, batch, self.kv_heads, self._tier_tokens(prompt_tokens),
                                 self.head_dim, self.kv_dtype or dense, dense)

    def _tier_tokens(self, prompt_tokens: int) -> int:
        """Tier slots per row for a prompt: what it can evict. A row evicts what it held before (at most the budget),
        plus the prompt, less what it keeps (at least budget - evict_batch + 1): prompt + evict_batch - 1 at most."""
        return prompt_tokens + self.evict_batch - 1

    def begin_prefill(self, prompt_tokens: int, batch: int, dtype: torch.dtype) -> None:
        """kvscope's runtime starts a prompt: with recall, its evictions wait in CPU memory (after checking there is
        room for them)."""
        if self.settings.recall is None:
            return
        import psutil

        need = self.recall_bytes(prompt_tokens, batch, dtype)
        free = psutil.virtual_memory().available
        if need > free:
            raise usage(f"the recall tier may need {format_bytes(need)} of host memory for {batch} x {prompt_tokens} "
                        f"prompt tokens, but {format_bytes(free)} is available",
                        expected="a shorter prompt or batch, or no recall", fix="recall (--recall)")
        from kvscope.cache.tier import Moves

        self.settings.recall_state, self.settings.recall_capacity = "record", self._tier_tokens(prompt_tokens)
        self.settings.moves = Moves()

    def last_prefill_forward(self) -> None:
        if self.settings.recall is not None:
            self.settings.recall_state = "final"

    def end_prefill(self) -> None:
        self.settings.recall_state, self.settings.moves = None, None  # what still waited goes with the tiers
        for layer in self.layers:
            if layer.is_initialized:
                layer.tier = None

    @property
    def recalled_tokens(self) -> list[int]:
        """Per layer: tokens the last recall brought back (in the row that took the most)."""
        return [layer.recalled if layer.is_initialized else 0 for layer in self.layers]

    # --- requests and continuation ---------------------------------------------------------------------------------
    def held_tokens(self) -> int:
        """The most tokens any (sequence, KV head) row holds now (one device read)."""
        first = self.layers[0]
        return int(first.state.valid.sum(-1).max()) if first.is_initialized else 0

    def check_request(self, new_prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, before any work, a request a non-evicting policy cannot hold: what is held already, plus the new
        prompt, plus every new token but the last (which is never fed back)."""
        if self.policy.evicts:
            return
        held = self.held_tokens()
        need = held + new_prompt_tokens + max_new_tokens - 1
        if need > self.budget_tokens:
            raise CacheFullError(
                f"the request needs {need} KV tokens per layer and sequence ({held} held + {new_prompt_tokens} "
                f"prompt + {max_new_tokens} new - 1, the last never being stored) but the budget is "
                f"{self.budget_tokens} (policy 'full' never evicts); expected a budget of at least {need}; change "
                f"budget_tokens (--budget) or pick an evicting policy ({', '.join(self.evicting_policies())})")

    def next_positions(self, batch: int, device) -> torch.Tensor:
        """[B] the position each row's next token takes (0 for an empty cache)."""
        first = self.layers[0]
        if not first.is_initialized:
            return torch.zeros(batch, dtype=torch.long, device=device)
        rows = first.state.newest.shape[0]
        if rows != batch:
            raise usage(f"this cache holds {rows} sequence(s) and cannot continue a batch of {batch}",
                        expected=f"{rows} row(s) of input_ids, or a new cache (or cache.reset())", fix="input_ids")
        return (first.state.newest.amax(1)[:, 0] + 1).clamp_min(0).to(device)

    def rewind(self, position: int) -> None:
        """Forget every token at position >= `position` (a chat history edited from there on is recomputed).
        Tokens below it that were evicted stay evicted."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise usage(f"rewind position must be a whole number >= 0, got {position!r}", fix="position")
        with torch.inference_mode():  # the cache's tensors were made under inference mode
            for layer in self.layers:
                layer.rewind(position)

    # --- monitoring ------------------------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        return self._stats(reset=False)

    def take_stats(self) -> CacheStats:
        """Stats since the last take, then reset the eviction counters (stored tokens are a level, not reset)."""
        return self._stats(reset=True)

    def _stats(self, reset: bool) -> CacheStats:
        live = [layer for layer in self.layers if layer.is_initialized]
        values = torch.stack([layer.stats_tensor() for layer in live]).tolist() if live else []  # one device read
        by_layer = dict(zip((layer.index for layer in live), values))
        return CacheStats(layers=[layer.stats(reset, by_layer.get(layer.index)) for layer in self.layers],
                          budget_tokens=self.budget_tokens,
                          policy=self.policy.name, kv_dtype=self.kv_dtype or "model dtype",
                          seen_tokens=self.get_seq_length())

    def swap_out(self) -> SwapReport:
        """Move the whole cache (storage and slot state) to pinned CPU memory; a no-op without CUDA."""
        return swap(self, "out")

    def swap_in(self) -> SwapReport:
        """Bring a swapped-out cache back to the model's device, bit-exactly."""
        return swap(self, "in")

    @property
    def gpu_resident_bytes(self) -> int:
        """Bytes held on the GPU: the whole allocation, or the two staging buffers when offloading."""
        if self.offloader is not None:
            return self.offloader.bytes_resident()
        arena = self.settings.arena
        return arena.nbytes if arena is not None and arena.buffer.is_cuda else 0

    @property
    def allocated_bytes(self) -> int:
        """KV storage bytes (scales included) of every layer; `allocation_bytes` adds the slot state."""
        return sum(layer.store.nbytes for layer in self.layers if layer.is_initialized)


def _check_int(name: str, value, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise usage(f"{name} must be a whole number >= 1, got {value!r}", fix=option)


def _before_forward(module, kwargs: dict) -> None:
    cache = _compat.forward_cache_argument(kwargs)
    if not isinstance(cache, BudgetedCache):
        _ACTIVE.append(None)
        return
    dtype = next(module.parameters()).dtype
    cache.begin_forward(kwargs, dtype)
    cache.settings.last_seen_attention = _compat.swap_attention_implementation(module, _compat.KVSCOPE_ATTENTION)
    _ACTIVE.append(cache)


def _after_forward(module) -> None:
    cache = _ACTIVE.pop() if _ACTIVE else None
    if cache is not None:
        _compat.swap_attention_implementation(module, cache.settings.last_seen_attention)
        cache.forward_info = None
        for layer in cache.layers:
            layer.pending = None


def budgeted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """kvscope's attention function (registered with transformers' AttentionInterface)."""
    cache = _ACTIVE[-1] if _ACTIVE else None
    if cache is None:  # not inside a BudgetedCache forward: behave exactly like sdpa
        return _compat.sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.layers[_compat.layer_index(module)].attend(query, scale, cache.forward_info)
    return out.transpose(1, 2).contiguous(), None


__all__ = ["BudgetedCache"]
