"""The recall tier of a `BudgetedCache` (`recall="cpu"`): what a bounded prefill evicts waits in CPU memory, and once
the prompt's last chunk arrives the best tokens come back.

Why: chunked prefill keeps GPU memory at budget + one chunk whatever the prompt length, but the policy must evict
before it has seen the end of the prompt, where the question usually is. With the tier, an eviction during prefill
moves the evicted tokens (in the store's own format: fp8/int8 stay small; int4 waits as int8, its keys being quantized
per 64-slot group) with their positions and scores to CPU memory (pinned on CUDA) instead of dropping them. When the
last prefill chunk reaches a layer, before that chunk attends: the chunk's last queries (the question: the policy's
observation window, or `RECALL_WINDOW` rows for a policy that observes every query) attend to every older token,
resident or waiting (the waiting ones stream through the GPU one chunk at a time); the policy scores them all with that
attention as it scores an observation; the best `budget` are the ones resident when the chunk attends. The others are
dropped and the tier is freed. KV on the GPU never exceeds budget + one chunk, plus one chunk in flight.

Only kvscope's runtime (`kvscope.runtime.generate`) says which forward is a prompt's last; `model.generate()` prefills
in one forward and never recalls. Copies to the tier run on a side CUDA stream and overlap the next chunk's compute.
"""

from __future__ import annotations

import torch

from kvscope.cache.store import gather_slots, layout_of, make_store, wrap_store
from kvscope.errors import usage
from kvscope.kvformats import recall_format
from kvscope.policies.base import Observation, SlotState, select_evictions

RECALL_WINDOW = 32  # question rows that score the recall, for a policy that observes every query (h2o, lru)
MODES = ("cpu",)


def check_recall(policy, offload: bool, recall: str | None) -> None:
    """The usage errors of an impossible `recall`."""
    if recall is None:
        return
    if recall not in MODES:
        raise usage(f"unknown recall tier {recall!r}", expected="cpu, or none", fix="recall (--recall)")
    if not policy.query_rows():
        raise usage(f"policy {policy.name!r} reads no attention, so it cannot tell which waiting token the question "
                    "needs: a recall has nothing to score with", expected="snapkv, lru, h2o or tova",
                    fix="policy (--policy), or drop recall (--recall)")
    if offload:
        raise usage("recall keeps evicted tokens in CPU memory, and with offload every layer lives there already",
                    expected="one of offload and recall", fix="offload or recall (--recall)")


def window(policy) -> int:
    rows = policy.query_rows()
    return RECALL_WINDOW if rows < 0 else rows


class Tier:
    """One layer's waiting tokens: host buffers of `capacity` slots per row, their positions, scores and validity.

    The host buffers are slot-major ([slots, B, H, ...]; the stores' are [B, H, slots, ...]) so that the slots one
    eviction adds, and the slots a recall streams back, are one contiguous span: a copy between pinned memory and the
    GPU is then asynchronous. A strided span of pinned memory would be copied through a pageable temporary, which
    blocks the host until the GPU's queue drains, once per layer and chunk."""

    def __init__(self, layer, capacity: int):
        st = layer.state
        self.rows = tuple(st.valid.shape[:2])
        self.store_kind = layer.settings.kv_dtype or _dense_name(layer.compute_dtype)  # the layer's own format
        self.kind = recall_format(self.store_kind)  # the tier's
        self.dtype = layer.compute_dtype
        self.head_dim = layer.head_dim
        self.pin = st.valid.is_cuda  # pinned host memory: copies to and from it are asynchronous
        self.capacity = capacity
        self.buffers = self._allocate(capacity)
        # Invariant: slots [0, used) of every row were written (invalid ones pad the rows that evicted fewer), and
        # nothing reads past `used`: the buffers are allocated unwritten.
        self.used = 0
        self.stream = torch.cuda.Stream(device=st.valid.device) if self.pin else None

    def _allocate(self, capacity: int) -> dict[tuple, torch.Tensor]:
        """Every host buffer, allocated pinned at once: a pageable buffer pinned afterwards would be allocated, zeroed
        and copied once more (gigabytes for a long prompt)."""
        from kvscope.cache.arena import TORCH_TYPES

        b, h = self.rows
        out = {("store", name): _host((capacity, b, h, *shape[3:]), TORCH_TYPES[k], self.pin)
               for name, shape, k in layout_of(self.kind, b, h, capacity, self.head_dim, self.dtype)}
        for name, dtype in (("position", torch.long), ("score", torch.float32), ("valid", torch.bool)):
            out[(name,)] = _host((capacity, b, h), dtype, self.pin)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers.values())

    def add(self, layer, evict: torch.Tensor, count: int) -> None:
        """Move the slots `evict` marks ([B, H, S] bool) here, before the layer invalidates them. `count` is a bound
        the host knows on what any row evicts (the layer's held-token bound minus what it keeps), so no device read
        is needed: rows that evict fewer are padded with slots marked not valid."""
        count = min(count, layer.capacity)
        if count <= 0:
            return
        if self.used + count > self.capacity:  # the host's bound, not what rows evict, can pass the tier's size
            self._grow(self.used + count + layer.room)
        st = layer.state
        slots = torch.argsort((~evict).to(torch.int8), dim=-1, stable=True)[:, :, :count]  # evicted slots first
        parts = {**{("store", n): t for n, t in self._stored(layer, slots).items()},
                 ("position",): st.position.gather(-1, slots), ("score",): st.score.gather(-1, slots),
                 ("valid",): evict.gather(-1, slots)}
        parts = {key: t.movedim(2, 0).contiguous() for key, t in parts.items()}  # slot-major, as the host buffers
        span = slice(self.used, self.used + count)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self._copy(span, parts)
            for t in parts.values():  # their memory is reused once the copy is done, not when the tier is freed
                t.record_stream(self.stream)
        else:
            self._copy(span, parts)
        self.used += count

    def _stored(self, layer, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tier-format tensors [B, H, n, ...] of a layer's `slots`: the store's own bytes when the tier keeps its
        format (exact, and no dequantizing of the whole store), else re-quantized on the device (int4 waits as int8)."""
        if self.kind == self.store_kind:
            return {n: gather_slots(t, slots) for n, t in layer.store.tensors().items()}
        k, v = read_slots(layer, slots)
        staging = make_store(self.kind, *k.shape[:3], self.head_dim, self.dtype, k.device)
        staging.write_range(0, k, v)
        return staging.tensors()

    def _copy(self, span: slice, parts: dict) -> None:
        for key, t in parts.items():
            self.buffers[key][span].copy_(t, non_blocking=True)

    def _grow(self, need: int) -> None:
        self.wait()
        old, self.capacity = self.buffers, need
        self.buffers = self._allocate(self.capacity)
        for key, t in old.items():
            self.buffers[key][:self.used].copy_(t[:self.used])

    def wait(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def to_device(self, name: str, span: slice, device) -> torch.Tensor:
        """[B, H, n] of the per-slot buffer `name` over `span`, on `device`."""
        return self.buffers[(name,)][span].to(device, non_blocking=True).movedim(0, 2)

    def keys(self, span: slice, device) -> torch.Tensor:
        """Keys of the tier slots `span` on `device`: for a dense tier only the keys cross to the GPU (half the
        bytes); a quantized one keeps keys and values in one buffer, so both go."""
        keys = self.buffers.get(("store", "keys"))
        if keys is None or keys.dtype != self.dtype:
            return self.keys_values(span, device)[0]
        return keys[span].to(device, non_blocking=True).movedim(0, 2)

    def keys_values(self, index: torch.Tensor | slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tier slots `index` (a slice, or [B, H, n] per row), dequantized on `device`."""
        raw = {key[1]: t for key, t in self.buffers.items() if key[0] == "store"}
        if isinstance(index, slice):  # one contiguous span: an asynchronous copy from pinned memory
            moved = {n: t[index].to(device, non_blocking=True).movedim(0, 2).contiguous() for n, t in raw.items()}
        else:
            moved = {n: gather_slots(t.movedim(0, 2), index).to(device, non_blocking=True) for n, t in raw.items()}
        n = next(iter(moved.values())).shape[2]
        return wrap_store(self.kind, moved).read(n, self.dtype)


def _host(shape, dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _dense_name(dtype: torch.dtype) -> str:
    from kvscope.cache.arena import TYPE_NAMES

    return TYPE_NAMES[dtype]


def read_slots(layer, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, H, n, D] of `slots` [B, H, n] of a layer's store, in the compute dtype."""
    k, v = layer.store.read(layer.capacity, layer.compute_dtype)
    index = slots[..., None].expand(*slots.shape, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)


def recall(layer, tier: Tier, query: torch.Tensor, positions: torch.Tensor, scaling: float) -> int:
    """Before the last prefill chunk attends: score resident and waiting tokens with that chunk's last queries
    (`query` [B, Hq, W, D] at true `positions` [B, W]), keep the best `budget` resident (bringing back the waiting ones
    among them), drop the rest. Returns how many came back (in the row that took the most)."""
    tier.wait()
    st, settings = layer.state, layer.settings
    device, capacity, t = st.valid.device, layer.capacity, tier.used
    weights = _question_weights(layer, tier, query, scaling)  # [B, H, W, S + T]
    held = slice(0, t)
    both = SlotState(valid=torch.cat([st.valid, tier.to_device("valid", held, device)], -1),
                     position=torch.cat([st.position, tier.to_device("position", held, device)], -1),
                     score=torch.cat([st.score, tier.to_device("score", held, device)], -1), newest=st.newest.clone())
    policy = settings.policy
    policy.observe(both, Observation(weights, positions, rows=query.shape[2], first=True))
    del weights
    kept = both.valid & ~select_evictions(policy.keep_scores(both, settings.budget_tokens), both,
                                          settings.budget_tokens)
    st.valid &= kept[:, :, :capacity]  # resident tokens not kept leave
    st.score.copy_(both.score[:, :, :capacity])
    back = kept[:, :, capacity:]  # [B, H, T]: waiting tokens kept come back into free slots
    count = int(back.sum(-1).max())
    order = torch.argsort((~back).to(torch.int8), dim=-1, stable=True)[:, :, :count]
    free = torch.argsort(st.valid.to(torch.int8), dim=-1, stable=True)[:, :, :count]
    step = max(1, layer.room)
    for start in range(0, count, step):
        part, slots = order[:, :, start:start + step], free[:, :, start:start + step]
        kb, vb = tier.keys_values(part.cpu(), device)
        layer.store.write(slots, kb.to(query.dtype), vb.to(query.dtype))
        st.position.scatter_(-1, slots, both.position[:, :, capacity:].gather(-1, part))
        st.score.scatter_(-1, slots, both.score[:, :, capacity:].gather(-1, part))
        st.valid.scatter_(-1, slots, back.gather(-1, part))
    return count


def _key_chunks(layer, tier: Tier, dtype: torch.dtype):
    """(keys [B, H, n, D], valid [B, H, n]) of the resident slots, then of the waiting tokens one chunk at a time."""
    device, step = layer.state.valid.device, max(1, layer.room)
    yield layer.store.read(layer.capacity, dtype)[0], layer.state.valid
    for start in range(0, tier.used, step):
        span = slice(start, min(tier.used, start + step))
        yield tier.keys(span, device), tier.to_device("valid", span, device)


def _question_weights(layer, tier: Tier, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """[B, H, W, S + T]: each question query's softmax over the resident then the waiting tokens, averaged over the
    query heads of each KV head. Two passes over the keys, one chunk on the GPU at a time: the first finds each query
    head's log-sum-exp, the second writes the averaged weights. The fp32 logits of every token at once would take g
    (query heads per KV head) times the weights' bytes: 4x for Llama 3, more than a chunk of KV at a long prompt."""
    b, hq, w, d = query.shape
    h = layer.state.valid.shape[1]
    grouped = query.reshape(b, h, (hq // h) * w, d).float() * scaling  # once, not per chunk

    def logits(keys, valid):
        return (grouped @ keys.float().transpose(-1, -2)).masked_fill_(~valid[:, :, None, :], float("-inf"))

    lse = None
    for keys, valid in _key_chunks(layer, tier, query.dtype):
        part = torch.logsumexp(logits(keys, valid), -1)  # [B, H, g*W]
        lse = part if lse is None else torch.logaddexp(lse, part)
    lse = lse.clamp_min(-1e30)[..., None]  # a query with no valid token: weights 0, not NaN
    out = torch.empty(b, h, w, layer.capacity + tier.used, dtype=torch.float32, device=query.device)
    at = 0
    for keys, valid in _key_chunks(layer, tier, query.dtype):
        weights = logits(keys, valid).sub_(lse).exp_()
        n = weights.shape[-1]
        out[..., at:at + n] = weights.view(b, h, hq // h, w, n).mean(2)
        at += n
    return out
