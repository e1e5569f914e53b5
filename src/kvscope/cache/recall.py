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

from kvscope.cache.store import layout_of, make_store, wrap_store
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
    """One layer's waiting tokens: a CPU store of `capacity` slots per row, their positions, scores and validity."""

    def __init__(self, layer, capacity: int):
        st = layer.state
        b, h = st.valid.shape[:2]
        self.kind = recall_format(layer.settings.kv_dtype or _dense_name(layer.compute_dtype))
        self.dtype = layer.compute_dtype
        self.head_dim = layer.head_dim
        pin = st.valid.is_cuda  # pinned host memory: copies to and from it are asynchronous
        self.store = _host_store(self.kind, b, h, capacity, self.head_dim, self.dtype, pin)
        self.position = _host((b, h, capacity), torch.long, pin)
        self.score = _host((b, h, capacity), torch.float32, pin)
        self.valid = _host((b, h, capacity), torch.bool, pin)
        # Invariant: slots [0, used) of every row were written (invalid ones pad the rows that evicted fewer), and
        # nothing reads past `used`: the buffers are allocated unwritten.
        self.used = 0
        self.stream = torch.cuda.Stream(device=st.valid.device) if pin else None

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.position.nbytes + self.score.nbytes + self.valid.nbytes

    def add(self, layer, evict: torch.Tensor) -> None:
        """Move the slots `evict` marks ([B, H, S] bool) here, before the layer invalidates them."""
        count = int(evict.sum(-1).max())
        if count == 0:
            return
        st = layer.state
        slots = torch.argsort((~evict).to(torch.int8), dim=-1, stable=True)[:, :, :count]  # evicted slots first
        k, v = read_slots(layer, slots)
        staging = make_store(self.kind, *k.shape[:3], self.head_dim, self.dtype, k.device)  # quantized on the device
        staging.write_range(0, k, v)
        parts = {**{("store", n): t for n, t in staging.tensors().items()},
                 ("position",): st.position.gather(-1, slots), ("score",): st.score.gather(-1, slots),
                 ("valid",): evict.gather(-1, slots)}
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

    def _copy(self, span: slice, parts: dict) -> None:
        for key, t in parts.items():
            target = getattr(self.store, key[1]) if key[0] == "store" else getattr(self, key[0])
            target[:, :, span].copy_(t, non_blocking=True)

    def wait(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def keys_values(self, index: torch.Tensor | slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tier slots `index` (a slice, or [B, H, n] per row), dequantized on `device`."""
        if isinstance(index, slice):
            raw = {n: t[:, :, index] for n, t in self.store.tensors().items()}
        else:
            raw = {n: _gather(t, index) for n, t in self.store.tensors().items()}
        moved = {n: t.to(device, non_blocking=True) for n, t in raw.items()}
        n = next(iter(moved.values())).shape[2]
        return wrap_store(self.kind, moved).read(n, self.dtype)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`t`'s slots `index` [B, H, n] along dim 2. One-byte float types are gathered as bytes: CPU gather has no fp8."""
    raw = t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t
    out = raw.gather(2, index.reshape(*index.shape, *[1] * (t.dim() - 3)).expand(*index.shape, *t.shape[3:]))
    return out.view(t.dtype)


def _host(shape, dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _host_store(kind: str, b: int, h: int, capacity: int, head_dim: int, dtype: torch.dtype, pin: bool):
    """The tier's store on host buffers allocated pinned at once: a pageable buffer pinned afterwards would be
    allocated, zeroed and copied once more (gigabytes for a long prompt)."""
    from kvscope.cache.arena import TORCH_TYPES

    tensors = {name: torch.empty(shape, dtype=TORCH_TYPES[k], pin_memory=pin)
               for name, shape, k in layout_of(kind, b, h, capacity, head_dim, dtype)}
    return make_store(kind, b, h, capacity, head_dim, dtype, "cpu", tensors)


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
    b, h = st.valid.shape[:2]
    step = max(1, layer.room)
    k, _ = layer.store.read(capacity, query.dtype)
    logits = [_logits(query, k, st.valid, scaling)]
    del k
    for start in range(0, t, step):  # the waiting tokens, one chunk on the GPU at a time
        end = min(t, start + step)
        kb, _ = tier.keys_values(slice(start, end), device)
        logits.append(_logits(query, kb, tier.valid[:, :, start:end].to(device), scaling))
    weights = torch.cat(logits, -1).softmax(-1)  # [B, H, g*W, S + T]
    del logits
    weights = weights.reshape(b, h, query.shape[1] // h, query.shape[2], -1).mean(2)  # [B, H, W, S + T]
    both = SlotState(valid=torch.cat([st.valid, tier.valid[:, :, :t].to(device)], -1),
                     position=torch.cat([st.position, tier.position[:, :, :t].to(device)], -1),
                     score=torch.cat([st.score, tier.score[:, :, :t].to(device)], -1), newest=st.newest.clone())
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
    for start in range(0, count, step):
        part, slots = order[:, :, start:start + step], free[:, :, start:start + step]
        kb, vb = tier.keys_values(part.cpu(), device)
        layer.store.write(slots, kb.to(query.dtype), vb.to(query.dtype))
        st.position.scatter_(-1, slots, both.position[:, :, capacity:].gather(-1, part))
        st.score.scatter_(-1, slots, both.score[:, :, capacity:].gather(-1, part))
        st.valid.scatter_(-1, slots, back.gather(-1, part))
    return count


def _logits(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """[B, H, g*W, n] fp32 logits of the grouped queries against `keys` [B, H, n, D]; -inf where not `valid`."""
    b, hq, w, d = query.shape
    h = keys.shape[1]
    grouped = query.reshape(b, h, (hq // h) * w, d).float()
    out = (grouped @ keys.float().transpose(-1, -2)) * scaling
    return out.masked_fill(~valid[:, :, None, :], float("-inf"))
