"""What every eviction policy shares: the per-slot state it reads, the scoring contract and the eviction step.

A policy never moves data. It gives every stored slot a keep-score ([batch, kv_heads, slots], higher = keep) and the
cache evicts the lowest-scoring valid slots until each (sequence, KV head) row holds at most `budget` tokens. Ties are
broken by true position, oldest first, so every policy is deterministic on equal scores.

Time is measured in token positions, not in forward calls: "recent", "last used" and "age" all compare positions, so
a policy behaves the same whether the prompt arrives in one chunk or many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvscope.errors import usage

INSERT_SCORES = ("zero", "position")  # the `Policy.insert_score`s an insert kernel can write (besides None)
KEEP = float("inf")  # the score of a slot that must not be evicted
REGISTRY: dict[str, type[Policy]] = {}  # name -> class, filled by `Policy.__init_subclass__`


@dataclass
class SlotState:
    """Per-layer, per-slot facts a policy may read ([batch, kv_heads, slots] each). `score` belongs to the policy."""

    valid: torch.Tensor  # bool: the slot holds a real token
    position: torch.Tensor  # long: the token's true (RoPE) position
    score: torch.Tensor  # float32: the policy's running statistic (accumulated attention, last use...)
    newest: torch.Tensor  # long [batch, kv_heads, 1]: the largest position stored so far in the row

    @classmethod
    def empty(cls, batch: int, heads: int, slots: int, device) -> SlotState:
        return cls(valid=torch.zeros(batch, heads, slots, dtype=torch.bool, device=device),
                   position=torch.zeros(batch, heads, slots, dtype=torch.long, device=device),
                   score=torch.zeros(batch, heads, slots, dtype=torch.float32, device=device),
                   newest=torch.full((batch, heads, 1), -1, dtype=torch.long, device=device))


@dataclass
class Observation:
    """Attention that a policy asked for: `weights` [batch, kv_heads, queries, slots] (mean over the query heads of
    each KV head, softmax over stored slots) and the true positions of those queries [batch, queries]."""

    weights: torch.Tensor
    query_position: torch.Tensor
    # A chunk's observed rows may come in several blocks (the layer bounds the [rows, slots] matrix it builds; at long
    # contexts a block can be a few rows): `rows` is how many rows the whole observation has, `first` marks its first
    # block. A policy whose statistic is not a plain sum or max over rows (snapkv's mean) needs them.
    rows: int = 0  # 0: this block is the whole observation
    first: bool = True

    @property
    def total_rows(self) -> int:
        return self.rows or self.weights.shape[2]


@dataclass
class Policy:
    """Base class. Subclasses set `name`, `attention` and override `keep_scores`, optionally `on_insert`/`observe`.

    `attention` says which queries' attention the policy needs: "none", "last" (the newest query), "window" (the last
    `window` queries) or "all". The cache computes only those rows, so cheap policies cost nothing extra.
    """

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    attention: ClassVar[str] = "none"
    evicts: ClassVar[bool] = True
    # a decode step's weights may be narrower than the slot state (the slots a compacted cache reads: the rest hold
    # no token); a policy that cannot take that gets them padded with zeros to every slot
    narrow_decode_weights: ClassVar[bool] = False
    # what `on_insert` writes, when it is one of INSERT_SCORES: "zero" or "position" (the token's own), which kernels
    # that insert a token can write in the same launch; None (the default of a class with its own on_insert): only
    # `on_insert` knows
    insert_score: ClassVar[str | None] = "zero"
    seed: int = field(default=0, repr=False)

    def __init_subclass__(cls, **kwargs) -> None:
        # A class that names itself is a policy users can pick: it registers itself, as transformers' cache layers
        # do, so the registry never imports the policies back. Intermediate bases (no `name` of their own) do not.
        super().__init_subclass__(**kwargs)
        if "on_insert" in cls.__dict__ and "insert_score" not in cls.__dict__:
            cls.insert_score = None  # a policy's own on_insert, unless it says what it writes
        if cls.insert_score is not None and cls.insert_score not in INSERT_SCORES:
            raise TypeError(f"{cls.__name__}.insert_score must be None or one of {INSERT_SCORES}, "
                            f"got {cls.insert_score!r}")
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def min_budget(self) -> int:
        """The smallest budget this policy can work with (its fixed part plus one)."""
        return 1

    def query_rows(self) -> int:
        """How many of the newest queries' attention `observe` needs (0 = none, -1 = all)."""
        return {"none": 0, "last": 1, "all": -1}.get(self.attention, getattr(self, "window", 1))

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Initialise `state.score` at newly written `slots` [B, H, N]; `keys` [B, H, N, D] are the new keys.
        `state.position` is already set for them."""
        state.score.scatter_(-1, slots, 0.0)

    def observe(self, state: SlotState, obs: Observation) -> None:
        """Update `state.score` from attention weights (only called when `attention != "none"`). Write nothing else:
        on CUDA a decode step's observation runs on a second stream, joined at the step's end (kvscope.runtime.step),
        and nothing on the step's path reads the scores before then."""

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        raise NotImplementedError

    def check_budget(self, budget: int) -> None:
        if budget < self.min_budget():
            raise usage(f"budget of {budget} tokens is below the minimum of policy {self.name!r}",
                        expected=f"at least {self.min_budget()} tokens ({self.describe_minimum()})",
                        fix="--budget or the policy's knobs")

    def describe_minimum(self) -> str:
        return "one token"


@dataclass
class ProtectedScores(Policy):
    """A keep-score per token plus a fixed set of tokens that are never evicted: the `recent` newest ones unless a
    subclass says otherwise (`protected`). The knob that counts them is `KNOB`; the budget must hold them and one
    more token. Subclasses write `on_insert` (the score) or `scores`."""

    KNOB: ClassVar[str] = "recent"
    MINIMUM: ClassVar[str] = "{n} recent tokens + 1"  # how `describe_minimum` says it

    def __post_init__(self) -> None:
        from kvscope.policies._checks import non_negative_int

        non_negative_int(self.name, self.KNOB, self.fixed_tokens)

    @property
    def fixed_tokens(self) -> int:
        return getattr(self, self.KNOB)

    def min_budget(self) -> int:
        return self.fixed_tokens + 1

    def describe_minimum(self) -> str:
        return self.MINIMUM.format(n=self.fixed_tokens)

    def protected(self, state: SlotState) -> torch.Tensor:
        return recent_mask(state, self.fixed_tokens)

    def scores(self, state: SlotState) -> torch.Tensor:
        return state.score

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        return self.scores(state).masked_fill(self.protected(state), KEEP)


def recent_mask(state: SlotState, recent: int) -> torch.Tensor:
    """Slots whose position is among the `recent` newest positions of their row."""
    if recent <= 0:
        return torch.zeros_like(state.valid)
    return state.position > (state.newest - recent)


def select_evictions(scores: torch.Tensor, state: SlotState, budget: int) -> torch.Tensor:
    """Bool [B, H, S]: the valid slots to evict so that each row keeps at most `budget` tokens.

    Lowest score goes first; equal scores go oldest-position first. Invalid slots are never selected.
    """
    order, excess = eviction_order(scores, state, budget)
    return marked(order, excess, state.valid)[1]


def eviction_order(scores: torch.Tensor, state: SlotState, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(every slot [B, H, S] in eviction order: lowest score first, equal scores oldest first, invalid slots last;
    how many of each row's first slots go [B, H, 1]) so that each row keeps at most `budget` tokens."""
    excess = (state.valid.sum(-1, keepdim=True) - budget).clamp_min(0)
    return score_then_age(scores, state).argsort(dim=-1), excess


def marked(order: torch.Tensor, excess: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which slots of `order` go, in eviction order [B, H, S]; the same as a mask over the slots [B, H, S]) for
    `eviction_order`'s result."""
    leaves = torch.arange(order.shape[-1], device=order.device) < excess
    return leaves, torch.zeros_like(valid).scatter(-1, order, leaves)


def score_then_age(scores: torch.Tensor, state: SlotState) -> torch.Tensor:
    """Int64 [B, H, S] keys in the order (score, position), invalid slots last: one sort instead of two stable ones
    (by position, then by score). The high 32 bits are the fp32 score's bits mapped to a signed order (-0.0 counts as
    0.0, as it compares); the low 32 are the position (below 2**31; a row holds each position once)."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude so larger bits sort lower
    key = (ordered.to(torch.int64) << 32) | state.position
    return key.masked_fill(~state.valid, torch.iinfo(torch.int64).max)


def pool_in_position_order(scores: torch.Tensor, state: SlotState, kernel: int, mode: str = "avg") -> torch.Tensor:
    """Pool [B, H, S] scores over `kernel` neighbouring positions (slots are not stored in position order).

    `avg`: the mean over the neighbours (SnapKV's smoothing; invalid slots sort last and count with their own score).
    `max`: the largest score among the valid neighbours (a token inherits its neighbours' score); invalid slots
    neither give nor receive a score (they come back as -inf)."""
    # int32 keys (positions are below 2**31): a radix sort of half the passes of int64's
    key = state.position.to(torch.int32).masked_fill(~state.valid, torch.iinfo(torch.int32).max)
    order = key.argsort(dim=-1)
    if mode == "max":
        scores = scores.masked_fill(~state.valid, float("-inf"))
    ordered = scores.gather(-1, order)
    b, h, s = ordered.shape
    flat = ordered.reshape(b * h, 1, s)
    if mode == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    pooled = torch.empty_like(scores).scatter(-1, order, pooled.reshape(b, h, s))
    return pooled.masked_fill(~state.valid, float("-inf")) if mode == "max" else pooled


def widen(weights: torch.Tensor, slots: int) -> torch.Tensor:
    """Attention weights [..., n] padded with zeros to every slot of the row; as they are when n is that already
    (F.pad copies even when it pads nothing: a launch per layer and decode step)."""
    return weights if weights.shape[-1] == slots else F.pad(weights, (0, slots - weights.shape[-1]))
