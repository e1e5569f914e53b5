"""One conversation: its KV cache, the exact token ids that cache holds, and its counters.

A session is continued, not recomputed: a turn compares the token ids of its prompt (the whole conversation so far)
with the ids the cache holds, keeps the common prefix, rewinds the cache past it when the history was edited, and
prefills only what follows. After the turn the record is the prompt plus exactly the new tokens that went into the
cache (`Generation.fed_tokens`), so the next comparison is exact.

States: `new` (never ran), `idle` (KV resident on the model's device), `swapped` (KV in pinned CPU memory, CUDA only),
`dropped` (KV freed; the next turn recomputes it). A session is `busy` while a request holds it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from kvscope.cache import BudgetedCache
from kvscope.cache.arena import TYPE_NAMES
from kvscope.kvformats import INT4_RESIDUAL, kv_format


@dataclass(frozen=True)
class SessionConfig:
    """How a session's own cache is built: policy, per-session budget (tokens per layer), KV dtype, prefill chunk."""

    policy: str = "full"
    budget_tokens: int = 4096
    kv_dtype: str | None = None
    chunk_size: int = 512
    knobs: tuple = ()  # the policy's knobs, as (name, value) pairs
    recall: str | None = None  # "cpu": a turn's prefill evictions wait in host memory for its end (cache.recall)

    def capacity(self, first_forward: int) -> int:
        """Slots the cache allocates per layer: budget + room, room being one prefill chunk or the first forward if
        that is shorter, for an evicting policy; none for one that never evicts (docs/cache.md, "Storage")."""
        from kvscope.policies import get

        room = min(self.chunk_size, max(1, first_forward)) if get(self.policy).evicts else 0
        return self.budget_tokens + room


@dataclass
class SessionCounters:
    """What a session did, summed over its turns. Tokens are per layer: a token evicted from every layer counts once."""

    turns: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV was already held (prefix hits)
    computed_tokens: int = 0  # prompt tokens prefilled
    generated_tokens: int = 0
    evicted_tokens: float = 0.0  # evicted by the session's own policy, mean over layers
    swaps_in: int = 0
    swaps_out: int = 0
    drops: int = 0
    rewinds: int = 0  # turns whose history differed from the cached one (recomputed from the first difference)
    summaries: int = 0

    def add(self, other: SessionCounters) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class Session:
    """A conversation's KV and its record. The store decides when it is swapped or dropped; the engine runs turns."""

    id: str
    config: SessionConfig
    keyed: bool = True  # False: found by prefix matching (no session key was sent)
    history: object = None  # the session's history strategy (kvscope.chat.history), None for token-level use
    cache: BudgetedCache | None = field(default=None, repr=False)
    ids: list[int] = field(default_factory=list, repr=False)  # token ids whose KV the cache holds, in position order
    match_text: str = field(default="", repr=False)  # the last request's messages, rendered (for prefix matching)
    summary: object = field(default=None, repr=False)  # kvscope.chat.history.Summary when summarizing
    counters: SessionCounters = field(default_factory=SessionCounters)
    capacity_tokens: int = 0  # slots per layer the cache allocates (or is reserved to allocate); 0 when none
    swapped: bool = False
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @property
    def state(self) -> str:
        if self.busy:
            return "active"
        if self.swapped:
            return "swapped"
        if self.capacity_tokens and self.cache is not None:
            return "idle"
        return "dropped" if self.counters.turns else "new"

    @property
    def resident(self) -> bool:
        """Whether the session's KV counts against the device budget (held there, or reserved to be built)."""
        return self.capacity_tokens > 0 and not self.swapped

    def held_tokens(self) -> int:
        return self.cache.held_tokens() if self.cache is not None else 0

    # --- the cache's life ------------------------------------------------------------------------------------------
    def build_cache(self, model) -> None:
        c = self.config
        self.cache = BudgetedCache(model, c.policy, **dict(c.knobs), budget_tokens=c.budget_tokens, kv_dtype=c.kv_dtype,
                                   chunk_size=c.chunk_size, recall=c.recall)
        self.ids = []

    def drop(self) -> None:
        """Free the KV; the record of what was said stays (the next turn recomputes it)."""
        if self.cache is not None or self.swapped:
            self.counters.drops += 1
        self.cache, self.ids, self.capacity_tokens, self.swapped = None, [], 0, False

    def discard(self) -> None:
        """Free the KV after a failed turn (its content is unknown); not counted as a drop."""
        self.cache, self.ids, self.swapped = None, [], False

    def swap_out(self) -> float:
        """Move the KV to pinned CPU memory (CUDA only); seconds it took."""
        report = self.cache.swap_out()
        self.swapped = True
        self.counters.swaps_out += 1
        return report.seconds

    def swap_in(self) -> float:
        report = self.cache.swap_in()
        self.swapped = False
        self.counters.swaps_in += 1
        return report.seconds

    def can_swap(self) -> bool:
        """Swap frees device memory only where the KV lives on a CUDA device; on the CPU it is a no-op."""
        return self.cache is not None and self.cache.home_device.type == "cuda" and not self.swapped

    def rewind_to(self, position: int) -> None:
        """Forget the cached tokens at `position` and after (an edited history is recomputed from there)."""
        if position < len(self.ids):
            self.cache.rewind(position)
            self.ids = self.ids[:position]
            self.counters.rewinds += 1

    def touch(self) -> None:
        self.last_used = time.monotonic()


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def slot_bytes(model, kv_dtype: str | None) -> int:
    """Bytes one slot (one token in every layer) of a session's cache costs, scales included."""
    from kvscope import _compat

    layers, _, kv_heads, head_dim = _compat.attention_heads(model)
    fmt = kv_format(kv_dtype or TYPE_NAMES[next(model.parameters()).dtype])  # None: the model's own dtype
    return layers * kv_heads * fmt.bytes_per_head_token(head_dim, _dense_bytes(model))


def fixed_bytes(model, kv_dtype: str | None) -> int:
    """Bytes a session's cache costs whatever its size: int4's full-precision window of the newest tokens."""
    from kvscope import _compat

    if kv_dtype != "int4":
        return 0
    layers, _, kv_heads, head_dim = _compat.attention_heads(model)
    return layers * 2 * kv_heads * INT4_RESIDUAL * head_dim * _dense_bytes(model)


def _dense_bytes(model) -> int:
    return next(model.parameters()).element_size()
