"""One layer of a `BudgetedCache`: slot allocation, the layer's own attention mask, attention, scoring, eviction.

Invariants (tests check them):
- storage is allocated once at `capacity = budget + chunk` slots per (sequence, KV head) row and never grows;
- after every chunk, each row holds at most `budget` valid tokens;
- a key keeps the true RoPE position it was rotated with; queries use their true positions too, so after eviction
  the model sees exactly the attention it would see with the evicted tokens masked out (no re-indexing);
- a padding token is written (its own query must attend somewhere) but never becomes valid, so it is never kept.
"""

from __future__ import annotations

import torch

from kvscope._compat import cache_base_classes
from kvscope.cache import fused
from kvscope.cache.attention import attention_weights, causal_attention, chunk_visible, grouped_attention
from kvscope.cache.recall import decided
from kvscope.cache.stats import EvictionEvent, LayerCounters, LayerStats
from kvscope.cache.store import make_store
from kvscope.cache.tier import record_eviction
from kvscope.errors import KvscopeError, usage
from kvscope.kvformats import READ_BUFFER, attention_block_rows
from kvscope.policies.base import Observation, SlotState, eviction_order, marked, widen

_, CacheLayerMixin = cache_base_classes()

OBSERVE_BLOCK = 128  # query rows scored at once: bounds the [rows, slots] attention matrix policies ask for


class CacheFullError(KvscopeError, ValueError):
    """The `full` policy's budget was outgrown."""


def evicting_policies() -> list[str]:
    from kvscope.policies import available

    return [p for p in available() if p != "full"]


class BudgetedLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, settings, index: int, num_layers: int):
        # `settings` is shared by the layers of one cache; a layer never points back at the cache (see settings.py)
        self.settings, self.index, self.num_layers = settings, index, num_layers
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.store = self.state = self.queue = self.slot_out = None

    # --- transformers' per-layer API -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        s = self.settings
        batch, heads, n, head_dim = key_states.shape
        self.device = key_states.device
        # room for one chunk on top of the budget (evicting policies only); a first forward shorter than a chunk (a
        # short prompt) needs less, and a later, longer forward is then processed in pieces of `room` tokens
        self.room = s.room(n)
        self.capacity = s.budget_tokens + self.room
        self.compute_dtype, self.head_dim = key_states.dtype, head_dim
        self.tier, self.recalled = None, 0
        if s.offloader is not None:  # offload: pinned per-layer masters and two GPU staging buffers, no arena
            self.store = make_store(s.kv_dtype, batch, heads, self.capacity, head_dim, key_states.dtype, self.device)
            s.offloader.adopt(self.index, self.store)
            self.state = SlotState.empty(batch, heads, self.capacity, self.device)
        else:
            if self.index == 0 or s.arena is None:  # the first layer to see a forward allocates every layer at once
                s.allocate(self.num_layers, batch, heads, head_dim, key_states.dtype, self.device, n)
            views = s.arena.take(f"{self.index}.")
            store = {name[len("store."):]: t for name, t in views.items() if name.startswith("store.")}
            self.store = make_store(s.kv_dtype, batch, heads, self.capacity, head_dim, key_states.dtype, self.device,
                                    store)
            views["newest"].fill_(-1)
            self._point(views)
        counters = getattr(self, "counters", None)
        if counters is not None and counters.device == self.device:
            counters.reset()  # the same tensors: what a CUDA graph captured over them stays valid
        else:
            self.counters = LayerCounters(self.device)
        self.fill = 0  # slots [0, fill) have been written; while `contiguous`, new tokens go to [fill, fill + n)
        self.contiguous = True
        # every slot in [0, fill) holds a real token of every row, in position order: attention is then plain causal
        # attention over [0, fill) (no mask to build); padding, an eviction or a hole ends it
        self.dense = True
        self.upper = 0  # host-side upper bound on tokens held by any row (no device sync needed to know it)
        self.decode_width = self.capacity  # slots a decode step reads (narrower once compacted: static.compact)
        self.free, self.free_next = None, 0  # queue of free slots, rebuilt after each eviction
        # the fused decode attention's tl.dot needs a power-of-two head_dim of at least 16
        self.fusable = (fused.DECODE_ATTENTION and fused.available(key_states) and head_dim >= 16
                        and head_dim & (head_dim - 1) == 0)
        self.is_initialized = True

    def _point(self, views: dict[str, torch.Tensor]) -> None:
        self.state = SlotState(views["valid"], views["position"], views["score"], views["newest"])
        self.queue, self.slot_out = views["queue"], views["slot_out"]

    def rebind(self, views: dict[str, torch.Tensor]) -> None:
        """Point the layer at its views of a moved allocation (a swap), keeping every value."""
        self.store.bind({name[len("store."):]: t for name, t in views.items() if name.startswith("store.")})
        self._point(views)
        self.device = views["valid"].device

    def update(self, key_states, value_states, *args, **kwargs):
        # Stash only: the attention function (kvscope's, installed for the forward) consumes them chunk by chunk.
        if self.pending is not None:
            raise KvscopeError(
                f"layer {self.index}: keys were stored but never attended; BudgetedCache needs its own attention "
                f"function, but the model used {self.settings.last_seen_attention!r}; pass the cache to generate() "
                "or forward() as past_key_values and do not change attn_implementation during the run")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        # storage is rebuilt on the next update (batch size or device may differ)
        self.is_initialized = False
        self.store = self.state = self.queue = self.slot_out = None
        self.seen, self.pending = 0, None

    def rewind(self, position: int) -> None:
        """Invalidate the tokens at position >= `position` (see BudgetedCache.rewind)."""
        if not self.is_initialized:
            return
        st = self.state
        st.valid &= st.position < position
        st.newest.clamp_(max=position - 1)
        self.seen = min(self.seen, position)
        self.free = None
        if self.contiguous:  # keep filling in order after the last slot still held (one device read)
            held = st.valid.any(dim=(0, 1)).nonzero()
            self.fill = int(held.max()) + 1 if held.numel() else 0
            self.upper = min(self.upper, self.fill)
            # still dense when every slot below the new fill holds a token of every row
            self.dense = self.dense and bool(st.valid[:, :, :self.fill].all())

    def rescore(self) -> None:
        """The policy's scores of every stored token from `on_insert` alone (a copy switched to another policy)."""
        st, n = self.state, self.fill  # the slots written so far (all of them: a prefilled copy has evicted nothing)
        keys, _ = self.store.read(n, torch.float32)
        slots = torch.arange(n, device=self.device).expand(*st.valid.shape[:2], n)
        self.settings.policy.on_insert(st, slots, keys)

    def advanced(self, steps: int, evicted: bool) -> None:
        """The graph-safe decode (kvscope.cache.static) inserted `steps` tokens per row outside the eager path: bring
        the host-side bookkeeping up to date. Its queue hands out the lowest free slots, so a dense cache that evicted
        nothing was filled in order and stays dense; otherwise slots come from the free-slot queue from now on."""
        self.seen += steps
        self.upper += steps
        self.free = None
        if self.dense and not evicted and self.fill + steps <= self.capacity:
            self.fill += steps
        else:
            self.contiguous = self.dense = False

    def reorder_cache(self, beam_idx):
        raise usage("BudgetedCache does not support beam search", fix="num_beams=1")

    # --- attention -------------------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, scaling: float, info) -> torch.Tensor:
        """Attention output [B, Hq, q, D] for this forward's queries (`info`: their true positions and padding);
        inserts and evicts chunk by chunk."""
        if self.pending is None:
            raise KvscopeError(f"layer {self.index}: attention ran before the cache received its keys")
        keys, values = self.pending
        self.pending = None
        n = keys.shape[2]
        # pieces of `room`, evicting between them; a policy that never evicts takes the forward whole
        step = self.room or n
        offloader = self.settings.offloader
        if offloader is not None:
            offloader.activate(self.index, self.store)
        self.written = []  # (start, end) spans or scattered slot tensors, for the offload write-back
        self.dense = self.dense and info.all_real
        exact = choice = None
        if self.settings.recall_state == "final" and self.tier is not None:
            exact, choice = self._recall(query, info, scaling, keys, values)
        outs = [self._chunk(query[:, :, s:s + step], keys[:, :, s:s + step], values[:, :, s:s + step],
                            info.positions[:, s:s + step], info.real[:, s:s + step], scaling,
                            None if choice is None else (choice[0], *(t[:, :, s:s + step] for t in choice[1:]),
                                                         s + step >= n),
                            None if exact is None else exact[:, :, s:s + step])
                for s in range(0, n, step)]
        if offloader is not None:
            offloader.write_back(self.index, self.store, self.written)
        self.seen += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _chunk(self, query, keys, values, positions, real, scaling, choice=None, exact=None):
        """`choice`: what stays, when a recall chose it already (kvscope.cache.recall.decided); `exact`: the piece's
        output over the whole prompt, when a recall computed it (the piece then attends only to observe)."""
        st, policy = self.state, self.settings.policy
        self._settle()
        b, h, n, _ = keys.shape
        self.decode_width = self.capacity  # the eager path takes any free slot: compact again before a static decode
        if not policy.evicts:
            self._check_room(n)
        slots, upto = self._take_slots(n)
        self.dense = self.dense and self.contiguous
        fuse = n == 1 and self.fusable
        # what the chunk's queries may see besides the chunk itself (a one-token chunk needs no copy: see _decode)
        before = None if fuse or (self.dense and not policy.query_rows()) else st.valid[:, :, :upto].clone()
        if self.contiguous:
            self.store.write_range(self.fill - n, keys, values)
            self.written.append((self.fill - n, self.fill))
        else:
            self.store.write(slots, keys, values)
            self.written.append(slots)
        st.position.scatter_(-1, slots, positions[:, None, :].expand(b, h, n))
        st.valid.scatter_(-1, slots, real[:, None, :].expand(b, h, n))
        newest = torch.where(real, positions, -1).amax(-1)[:, None, None]
        torch.maximum(st.newest, newest, out=st.newest)
        policy.on_insert(st, slots, keys)
        if fuse:
            observe = policy.query_rows() and choice is None  # a recall's choice is made: nothing to observe
            out = self._decode(query, slots, upto, scaling, positions if observe else None)
        else:
            rows = policy.query_rows() if choice is None else 0  # a recall's choice is made: nothing to observe
            k = v = out = None
            if exact is None or rows:  # a recall's output needs no read of the slots, but an observation does
                k, v = self.read(upto, query.dtype)
            if exact is None:
                out = self._attention(query, k, v, before, slots, real, scaling)
            if rows:
                self._observe(query, k, before, slots, real, positions, rows if rows > 0 else n, scaling)
        self.upper += n
        if choice is not None:
            self._drop(decided(self, slots, real, choice), self.settings.budget_tokens)
        elif self.upper > self.settings.budget_tokens and policy.evicts:
            self._evict()
        return out if exact is None else exact

    def _attention(self, query, k, v, before, slots, real, scaling) -> torch.Tensor:
        b, hq, n, _ = query.shape
        if self.dense:  # plain causal attention over [0, upto), the chunk at its end
            return causal_attention(query, k, v, scaling)
        step = attention_block_rows(b, hq, k.shape[1], k.shape[2], query.element_size())
        blocks = [grouped_attention(query[:, :, i:i + step], k, v, self._mask(before, slots, real, i, i + step),
                                    scaling) for i in range(0, n, step)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)

    def _recall(self, query: torch.Tensor, info, scaling: float, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple:
        """The prompt's last forward: bring back the waiting tokens its question needs (kvscope.cache.recall);
        returns the forward's attention output over the whole prompt, and for a window policy which of the
        forward's tokens stay. `keys`, `values`: the forward's own."""
        from kvscope.cache.recall import recall, window  # looked up at each call: tests spy on it

        self._settle()
        w = min(window(self.settings.policy), query.shape[2])
        tier, self.tier = self.tier, None
        self.recalled, exact, choice = recall(self, tier, query, info.positions[:, -w:], scaling,
                                              (keys, values, info.real, info.positions))
        self.upper = self.settings.budget_tokens
        self.contiguous = self.dense = False
        self.free = None
        return exact, choice

    def _settle(self) -> None:
        """This layer's evicted slots still waiting to move to its tier (kvscope.cache.tier.Moves) go before the layer
        writes over them or recalls."""
        moves = self.settings.moves
        if moves is not None and moves.holds(self.index):
            moves.flush()

    def _check_room(self, n: int) -> None:
        """A policy that never evicts has no slots beyond its budget: refuse a chunk that would not fit."""
        budget = self.settings.budget_tokens
        if self.upper + n <= budget:
            return
        held = int(self.state.valid.sum(-1).max())
        self.upper = held
        if held + n > budget:
            raise CacheFullError(
                f"layer {self.index}: the sequence needs {held + n} KV tokens but the budget is {budget} "
                f"(policy 'full' never evicts); expected a budget of at least the prompt plus new tokens; "
                f"change --budget or pick an evicting policy ({', '.join(evicting_policies())})")

    def _decode(self, query, slots, upto: int, scaling: float, positions=None) -> torch.Tensor:
        """Attention of a one-token chunk, fused (kvscope.cache.attention_triton) when the kernel can run; with
        `positions` (a policy that reads attention), the policy also observes the token's attention weights, which the
        kernel returns from its own logits.

        For one token the unfused mask is the slot state after the insert with the token's own slot visible: every
        slot valid before the chunk, plus itself (a padding token is written but not valid, and still sees itself)."""
        own = slots[:, :, 0]
        observe = positions is not None
        ran, out = fused.run(self.state.valid, "attention_triton.decode_attention", self.store, query,
                             self.state.valid, own, upto, scaling, observe)
        weights = None
        if ran and observe:
            out, weights = out
        elif not ran:
            k, v = self.read(upto, query.dtype)
            mask = self.state.valid[:, :, :upto].scatter(-1, own[..., None], True)[:, :, None, :]
            out = grouped_attention(query, k, v, mask, scaling)
            if observe:
                weights = attention_weights(query, k, mask, scaling)
        if observe:
            weights = widen(weights, self.capacity)
            self.settings.policy.observe(self.state, Observation(weights, positions))
        return out

    def read(self, upto: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, upto) in `dtype`; a quantized store dequantizes into the read buffer all
        layers share (kvscope.kvformats.READ_BUFFER): they hold until the next read of any layer, and every read is
        used before the next one starts (layers, and the steps of one, run in order on one stream)."""
        arena = self.settings.arena
        out = arena.views.get(READ_BUFFER) if arena is not None else None
        if out is None or out.dtype != dtype:
            return self.store.read(upto, dtype)
        return self.store.read(upto, dtype, out=out)

    def _take_slots(self, n: int) -> tuple[torch.Tensor, int]:
        b, h = self.state.valid.shape[:2]
        if self.contiguous and self.fill + n <= self.capacity:
            slots = torch.arange(self.fill, self.fill + n, device=self.device).expand(b, h, n)
            self.fill += n
            return slots, self.fill
        self.contiguous = False
        self.fill = self.capacity
        if self.free is None or self.free_next + n > self.free.shape[-1]:
            # free slots first, lowest index first: at least `room` are free, because a row never keeps more than
            # `budget` tokens (a policy that never evicts, with no room, checked `n` fits: _check_room). Sorting once
            # per eviction (not per step) keeps decode cheap.
            order = torch.argsort(self.state.valid.to(torch.int8), dim=-1, stable=True)
            self.free, self.free_next = order[:, :, :max(self.room, n)].contiguous(), 0
        slots = self.free[:, :, self.free_next:self.free_next + n]
        self.free_next += n
        return slots, self.capacity

    def _mask(self, before: torch.Tensor, slots: torch.Tensor, real: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """Bool [B, H, rows, upto] for query rows [i0, i1) of the chunk: the tokens stored before the chunk, plus the
        chunk's own tokens in causal order; a padding query sees only itself."""
        b, h, n = slots.shape
        i1 = min(i1, n)
        rows = i1 - i0
        mask = before[:, :, None, :].expand(b, h, rows, before.shape[-1]).clone()
        visible = chunk_visible(real, i0, i1)  # [B, rows, n]
        mask.scatter_(-1, slots[:, :, None, :].expand(b, h, rows, n), visible[:, None].expand(b, h, rows, n))
        return mask

    def _observe(self, query, keys, before, slots, real, positions, rows, scaling):
        b, hq, n, _ = query.shape
        rows = min(rows, n)
        block = min(OBSERVE_BLOCK, attention_block_rows(b, hq, keys.shape[1], keys.shape[2], 12))
        for start in range(n - rows, n, block):
            end = min(start + block, n)
            mask = self._mask(before, slots, real, start, end)
            w = attention_weights(query[:, :, start:end], keys, mask, scaling)
            w = widen(w, self.capacity)
            self.settings.policy.observe(self.state, Observation(w, positions[:, start:end], rows=rows,
                                                              first=start == n - rows))

    def _evict(self) -> None:
        st, s = self.state, self.settings
        keep = s.budget_tokens - s.evict_batch + 1  # evict a few more than needed: the next evictions are skipped
        # the policy scores for what stays (`keep`, not the budget): a part it protects that grows with the budget
        # (h2o's recent share) must fit in `keep`, or the row would hold more than `upper` says
        order, excess = eviction_order(s.policy.keep_scores(st, keep), st, keep)
        leaves, evict = marked(order, excess, st.valid)  # in eviction order; over the slots
        if s.recall_state == "record":  # a bounded prefill with recall: the evicted tokens wait in CPU memory
            self.tier = record_eviction(self, self.tier, order, leaves, self.upper - keep)  # `upper`: what a row held
        self._drop(evict, keep)

    def _drop(self, evict: torch.Tensor, upper: int) -> None:
        """Invalidate the slots `evict` (bool [B, H, S]); `upper`: what a row holds at most afterwards."""
        self.counters.record(evict, self.state.position, self.state.newest)
        if self.settings.collector is not None:
            self._emit(evict)
        self.state.valid &= ~evict
        self.upper = upper
        self.contiguous = self.dense = False
        self.free = None

    def _emit(self, evict: torch.Tensor) -> None:
        entries = int(evict.sum())
        if not entries:  # a recall's choice can leave nothing to drop
            return
        positions = torch.unique(self.state.position[evict]).tolist()
        self.settings.collector(EvictionEvent(layer=self.index, position=int(self.state.newest.max()),
                                           evicted_entries=entries, evicted_positions=positions))

    # --- monitoring ------------------------------------------------------------------------------------------------
    def stats_tensor(self) -> torch.Tensor:
        """[7] int64 on the device: most tokens any row holds, entries held, then the five eviction counters. The
        cache stacks every layer's and reads them in one transfer: a host read per layer would stop the GPU's queue
        once per layer."""
        held = self.state.valid.sum(-1)
        c = self.counters
        return torch.stack([held.max(), held.sum(), c.evicted, c.evictions, c.age_sum, c.pos_min, c.pos_max])

    def stats(self, reset: bool = False, values: list[int] | None = None) -> LayerStats:
        if not self.is_initialized:
            return LayerStats(self.index, 0, 0, 0, 0, 0, 0, None, None, None)
        stored, entries, evicted, evictions, age_sum, pmin, pmax = values or self.stats_tensor().tolist()
        if reset:
            self.counters.reset()
        heads = self.state.valid.shape[1]
        return LayerStats(layer=self.index, stored_tokens=stored, stored_entries=entries,
                          capacity_tokens=self.capacity, evicted_tokens=evicted // heads, evictions=evictions,
                          bytes=self.store.nbytes, evicted_age_mean=(age_sum / evicted) if evicted else None,
                          evicted_position_min=pmin if evicted else None,
                          evicted_position_max=pmax if evicted else None)
