"""The graph-safe decode step of one `BudgetedLayer`: fixed shapes, no host synchronisation, no host state.

kvscope.runtime.step drives these once per layer and token; on CUDA the whole step is captured in a CUDA graph and
replayed, so nothing here may depend on a value the host would have to read, and nothing may allocate a new shape:

- the new token's slot comes from the layer's free-slot queue (`queue` [B, H, F], refilled from the slot state by
  `refill`), at an index `ptr` (a device scalar the step advances);
- attention reads all `capacity` slots (invalid ones are masked, and the fused kernel skips tiles with no visible
  slot), so the shapes never change as the cache fills;
- eviction (`evict`) and refills are separate captured steps that the host runs when its own counters say so, at the
  same points the eager path evicts (after the insert that takes a row over its budget), so both paths keep the same
  tokens.
"""

from __future__ import annotations

import torch

from kvscope.cache import fused
from kvscope.cache.store import gather_slots
from kvscope.policies.base import Observation, select_evictions, widen


def insert(layer, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor, ptr: torch.Tensor,
           rope=None) -> torch.Tensor:
    """Write one token per row (key/value [B, H, 1, D], true positions [B]) into the slot the queue gives at `ptr`;
    mark it valid with its position. Returns the slots [B, H, 1]. With `rope` = (query, cos, sin), the query and the
    key are first rotated in place (the same launch on CUDA); `key` must then be a contiguous head layout."""
    st, store = layer.state, layer.store
    ran, slot = fused.run(st.valid, "static_triton.insert", layer, key, value, position, ptr, rope)
    if not ran:
        if rope is not None:
            from kvscope.runtime.kernels import rotate

            q, cos, sin = rope
            q_rot, k_rot = rotate(q, key, cos, sin)
            q.copy_(q_rot)
            key.copy_(k_rot)
        b, h = st.valid.shape[:2]
        slot = layer.queue.gather(-1, ptr.view(1, 1, 1).expand(b, h, 1))
        store.write(slot, key, value)
        pos = position[:, None, None].expand(b, h, 1)
        st.position.scatter_(-1, slot, pos)
        st.valid.scatter_(-1, slot, True)
        torch.maximum(st.newest, pos, out=st.newest)
    policy = layer.settings.policy
    if not ran or policy.insert_score is None:  # the fused insert wrote any other score itself
        policy.on_insert(st, slot, key)
    return slot


def attend(layer, query: torch.Tensor, slot: torch.Tensor, position: torch.Tensor, scaling: float,
           defer=None) -> torch.Tensor:
    """Attention [B, Hq, 1, D] of one query per row over every slot; a policy that reads attention observes it.
    `defer(fn, *tensors)`, when given, runs the observation off the step's path (kvscope.runtime.step): it writes
    only the policy's scores, which nothing reads before the step ends."""
    from kvscope.cache.attention import attention_weights, grouped_attention

    st, policy = layer.state, layer.settings.policy
    observe = policy.query_rows() != 0
    own = slot[:, :, 0]
    width = layer.decode_width  # the slots a decode step can find a token in (see compact)
    ran, out = (False, None)
    if layer.fusable:
        ran, out = fused.run(st.valid, "attention_triton.decode_attention", layer.store, query, st.valid, own,
                             width, scaling, observe)
    weights = None
    if ran and observe:
        out, weights = out
    elif not ran:
        k, v = layer.read(width, query.dtype)
        mask = st.valid[:, :, None, :width]  # the token's own slot is valid already
        out = grouped_attention(query, k, v, mask, scaling)
        if observe:
            weights = attention_weights(query, k, mask, scaling)
    if observe:
        wide = weights if policy.narrow_decode_weights else widen(weights, layer.capacity)
        observation = Observation(wide, position[:, None])
        if defer is None:
            policy.observe(st, observation)
        else:
            defer(lambda: policy.observe(st, observation), wide, weights)
    return out


def compact(layer) -> None:
    """Move every row's tokens to its lowest slots, in slot order (kvscope's static decode calls this before
    decoding). Why: a chunked prefill leaves tokens anywhere in budget + chunk slots, and a decode step's attention
    reads every slot it may find a token in. After compacting, a row's tokens sit below the most it holds, and the
    decode step keeps them there: it fills the lowest free slots first (the queue), so the j-th new token after a
    refill goes below (tokens held at the refill) + j + 1, what the row holds once it is in; a row holds at most
    budget + 1 tokens (eviction follows the insert that takes it over). So a decode step reads `decode_width` =
    budget + 1 slots, not budget + chunk (2049 of 2560 at a 2048 budget and 512-token chunks). A permutation of slots
    changes no token and no score; int4 keys are quantized per group of 64 slots, so an int4 store, and an offloaded
    one, keep their slots and are read whole."""
    if not layer.is_initialized:
        return
    layer.decode_width = layer.capacity  # read whole unless compacted below (a copy may carry a narrower width)
    s = layer.settings
    if s.offloader is not None or not s.policy.evicts or getattr(layer.store, "GROUPED", False):
        return
    if not layer.dense:  # a dense cache holds its tokens in [0, fill) already
        st = layer.state
        order = torch.argsort((~st.valid).to(torch.int8), dim=-1, stable=True)  # held slots first, in order
        for t in layer.store.tensors().values():
            t.copy_(gather_slots(t, order))
        for t in (st.valid, st.position, st.score):
            t.copy_(t.gather(-1, order))
        layer.contiguous = False
        layer.free = None
    layer.decode_width = min(layer.capacity, s.budget_tokens + 1)


def evict(layer) -> None:
    """Evict every row down to `budget - evict_batch + 1` tokens (what `BudgetedLayer._evict` does, without the host
    reads), then refill the queue."""
    s, st = layer.settings, layer.state
    keep = s.budget_tokens - s.evict_batch + 1
    chosen = select_evictions(s.policy.keep_scores(st, keep), st, keep)
    layer.counters.record(chosen, st.position, st.newest)
    st.valid &= ~chosen
    refill(layer)


def refill(layer) -> None:
    """The queue takes the first free slots of each row, lowest index first (as the eager path's free list)."""
    order = torch.argsort(layer.state.valid.to(torch.int8), dim=-1, stable=True)
    layer.queue.copy_(order[:, :, :layer.queue.shape[-1]])
