"""Exact eviction order of every policy on hand-made tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from kvscope import policies
from kvscope.errors import UsageError
from kvscope.policies.base import Observation, SlotState, select_evictions


def state_of(positions: list[int], valid: list[bool] | None = None) -> SlotState:
    s = SlotState.empty(1, 1, len(positions), "cpu")
    s.position[0, 0] = torch.tensor(positions)
    s.valid[0, 0] = torch.tensor(valid if valid is not None else [True] * len(positions))
    s.newest[0, 0, 0] = max(p for p, v in zip(positions, s.valid[0, 0].tolist()) if v)
    return s


def insert_all(policy, s: SlotState, keys: torch.Tensor | None = None):
    n = s.position.shape[-1]
    slots = torch.arange(n)[None, None]
    policy.on_insert(s, slots, keys if keys is not None else torch.zeros(1, 1, n, 4))


def evicted(policy, s: SlotState, budget: int) -> list[int]:
    """Positions evicted, in slot order."""
    ev = select_evictions(policy.keep_scores(s, budget), s, budget)
    return sorted(s.position[ev].tolist())


def observe(policy, s, weights: list[list[float]], query_positions: list[int]):
    w = torch.tensor(weights, dtype=torch.float32)[None, None]
    policy.observe(s, Observation(w, torch.tensor([query_positions])))


def test_registry_lists_every_policy():
    assert policies.available() == ["full", "h2o", "knorm", "lru", "random", "sliding_window", "snapkv",
                                    "streaming_llm", "tova"]


@pytest.mark.parametrize("name", policies.available())
def test_insert_score_says_what_on_insert_writes(name):
    """A fused insert writes `insert_score` instead of calling `on_insert`: the two must agree."""
    policy = policies.get(name)
    s = state_of([9, 4, 7])
    s.score.fill_(-5.0)
    insert_all(policy, s, torch.randn(1, 1, 3, 4))
    expected = {"zero": torch.zeros(3), "position": torch.tensor([9.0, 4.0, 7.0])}
    if policy.insert_score is not None:
        assert torch.equal(s.score[0, 0], expected[policy.insert_score])


def test_insert_score_defaults_to_none_for_a_policy_with_its_own_on_insert():
    assert policies.get("lru").insert_score == "position" and policies.get("knorm").insert_score is None
    with pytest.raises(TypeError, match="insert_score"):
        type("Odd", (policies.Policy,), {"insert_score": "one"})


def test_select_evictions_breaks_ties_by_age_and_skips_invalid():
    s = state_of([5, 1, 3, 0, 4], valid=[True, True, True, False, True])
    ev = select_evictions(torch.zeros(1, 1, 5), s, budget=2)
    assert sorted(s.position[ev].tolist()) == [1, 3]  # oldest valid first; invalid slot 0 never chosen
    assert not ev[0, 0, 3]


def test_sliding_window_keeps_newest():
    p = policies.get("sliding_window")
    s = state_of([7, 2, 9, 4, 0])
    assert evicted(p, s, 3) == [0, 2]


def test_streaming_llm_keeps_sinks_then_recent():
    p = policies.get("streaming_llm", sink_tokens=2)
    s = state_of([0, 1, 2, 3, 4, 5, 6])
    assert evicted(p, s, 4) == [2, 3, 4]


def test_knorm_drops_largest_key_norm_but_keeps_recent():
    p = policies.get("knorm", recent=1)
    s = state_of([0, 1, 2, 3])
    keys = torch.tensor([1.0, 5.0, 2.0, 9.0])[None, None, :, None].expand(1, 1, 4, 4)
    insert_all(p, s, keys)
    assert evicted(p, s, 2) == [1, 2]  # norm 5 then 2 go; position 3 (norm 9) is protected as recent


def test_h2o_keeps_heavy_hitters_and_recent():
    p = policies.get("h2o", recent_ratio=0.5)
    s = state_of([0, 1, 2, 3, 4, 5])
    insert_all(p, s)
    observe(p, s, [[0.1, 0.6, 0.0, 0.2, 0.1, 0.0], [0.0, 0.5, 0.3, 0.0, 0.1, 0.1]], [4, 5])
    # budget 4: recent 2 (positions 4, 5) kept; of the rest, accumulated 0.1, 1.1, 0.3, 0.2 -> keep 1 and 2
    assert evicted(p, s, 4) == [0, 3]


def test_lru_evicts_least_recently_attended():
    p = policies.get("lru", threshold=0.25, top_k=0, spread=1)
    s = state_of([0, 1, 2, 3])
    insert_all(p, s)  # last use = arrival position
    observe(p, s, [[0.5, 0.0, 0.0, 0.5]], [10])  # query at 10 uses positions 0 and 3
    observe(p, s, [[0.0, 0.3, 0.0, 0.7]], [11])  # query at 11 uses 1 and 3
    # last use: 0 -> 10, 1 -> 11, 2 -> 2, 3 -> 11
    assert evicted(p, s, 3) == [2]
    assert evicted(p, s, 2) == [0, 2]


def test_lru_top_k_counts_as_use():
    p = policies.get("lru", threshold=0.99, top_k=1, spread=1)
    s = state_of([0, 1, 2])
    insert_all(p, s)
    observe(p, s, [[0.2, 0.1, 0.7]], [5])
    observe(p, s, [[0.6, 0.3, 0.1]], [6])
    assert evicted(p, s, 2) == [1]


def test_lru_spread_counts_a_use_for_the_neighbours():
    # slots out of position order; a query at 20 uses position 3 only
    positions = [7, 0, 3, 5, 1, 6, 2, 4]
    weights = [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    plain, spread = policies.get("lru", threshold=0.5, top_k=0, spread=1), policies.get("lru", threshold=0.5,
                                                                                          top_k=0, spread=3)
    for p in (plain, spread):
        s = state_of(positions)
        insert_all(p, s)
        observe(p, s, weights, [20])
        if p is plain:  # last use: 3 -> 20, others their arrival; keep 3 and the newest 7, 6, 5
            assert evicted(p, s, 4) == [0, 1, 2, 4]
        else:  # 2 and 4 inherit 20 from 3; then 7 (inherits 7 from itself), and 6 (inherits 7 from 7) ... keep 2-4, 7
            assert evicted(p, s, 4) == [0, 1, 5, 6]
            assert evicted(p, s, 3) == [0, 1, 5, 6, 7]


def test_lru_spread_skips_evicted_slots():
    p = policies.get("lru", threshold=0.5, top_k=0, spread=3)
    s = state_of([0, 1, 2, 3, 4, 5], valid=[True, True, True, False, True, True])
    insert_all(p, s)
    s.score[0, 0, 3] = 100.0  # a stale score in an evicted slot must not reach its neighbours (positions 2 and 4)
    observe(p, s, [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]], [9])  # position 1 used at 9: 0 and 2 inherit 9
    # pooled: 0 -> 9, 1 -> 9, 2 -> 9, 4 -> 5, 5 -> 5; keep 3: evict 4 and 5 (tie at 5 goes oldest first)
    assert evicted(p, s, 3) == [4, 5]
    assert evicted(p, s, 4) == [4]


def test_pool_in_position_order_max_and_avg():
    from kvscope.policies.base import pool_in_position_order

    s = state_of([2, 0, 1, 3], valid=[True, True, True, False])
    scores = torch.tensor([1.0, 4.0, 0.0, 9.0])[None, None]
    # position order: 0 (4.0), 1 (0.0), 2 (1.0); slot 3 invalid
    mx = pool_in_position_order(scores, s, 3, mode="max")[0, 0].tolist()
    assert mx[:3] == [1.0, 4.0, 4.0] and mx[3] == float("-inf")
    avg = pool_in_position_order(scores, s, 3, mode="avg")[0, 0].tolist()
    assert avg[:3] == pytest.approx([(0.0 + 1.0 + 9.0) / 3, 2.0, 5.0 / 3])


def test_knorm_keeps_eight_recent_by_default():
    p = policies.get("knorm")
    s = state_of(list(range(12)))
    keys = torch.arange(1.0, 13.0)[None, None, :, None].expand(1, 1, 12, 4)  # norms grow with position
    insert_all(p, s, keys)
    assert p.min_budget() == 9
    assert evicted(p, s, 10) == [2, 3]  # the largest norms outside the 8 newest (positions 4-11)
    assert evicted(policies.get("knorm", recent=0), s, 10) == [10, 11]


def test_random_keeps_recent_tokens():
    for seed in range(5):
        p = policies.get("random", recent=3, seed=seed)
        s = state_of(list(range(10)))
        insert_all(p, s)
        gone = evicted(p, s, 4)
        assert len(gone) == 6 and not set(gone) & {7, 8, 9}
    assert policies.get("random").min_budget() == 9
    with pytest.raises(ValueError, match=r"at least 4 tokens \(3 recent tokens \+ 1\)"):
        policies.get("random", recent=3).check_budget(3)


def test_tova_uses_the_newest_query_only():
    p = policies.get("tova")
    s = state_of([0, 1, 2, 3])
    insert_all(p, s)
    observe(p, s, [[0.9, 0.0, 0.0, 0.1], [0.1, 0.2, 0.4, 0.3]], [4, 5])
    assert evicted(p, s, 2) == [0, 1]


def test_snapkv_pools_in_position_order_and_keeps_window():
    p = policies.get("snapkv", window=1, kernel=3)
    # slots hold positions out of order: pooling must follow positions, not slots
    s = state_of([4, 0, 2, 1, 3])
    insert_all(p, s)
    w = [[0.0, 0.0, 0.0, 1.0, 0.0]]  # all attention on position 1 (slot 3)
    observe(p, s, w, [5])  # one query: moving average; ranks are the same as pooled scores
    # pooled (avg of neighbours): pos0 0.5, pos1 1/3, pos2 1/3, pos3 0, pos4 0 (kept: window=1 newest)
    assert evicted(p, s, 4) == [3]
    assert evicted(p, s, 3) == [1, 3]  # the 1/3 tie goes oldest first
    assert evicted(p, s, 2) == [1, 2, 3]


def test_random_is_seeded():
    a, b = policies.get("random", seed=3), policies.get("random", seed=3)
    s1, s2 = state_of(list(range(8))), state_of(list(range(8)))
    insert_all(a, s1)
    insert_all(b, s2)
    assert evicted(a, s1, 4) == evicted(b, s2, 4)
    assert len(evicted(a, s1, 4)) == 4


def test_full_never_scores_anything_for_eviction():
    p = policies.get("full")
    assert not p.evicts
    assert torch.isinf(p.keep_scores(state_of([0, 1]), 1)).all()


@pytest.mark.parametrize("name,knobs,message", [
    ("nope", {}, "unknown policy 'nope'; expected one of full, h2o"),
    ("streaming_llm", {"sink_tokens": -1}, "sink_tokens must be a whole number >= 0"),
    ("h2o", {"recent_ratio": 1.5}, "recent_ratio must be a fraction"),
    ("lru", {"threshold": "high"}, "threshold must be a fraction"),
    ("snapkv", {"kernel": 4}, "kernel must be odd"),
    ("lru", {"spread": 2}, "spread must be odd"),
    ("lru", {"spread": 0}, "spread must be a whole number >= 1"),
    ("random", {"recent": -1}, "recent must be a whole number >= 0"),
    ("snapkv", {"window": 0}, "window must be a whole number >= 1"),
    ("tova", {"window": 3}, "policy 'tova' has no knob window"),
])
def test_bad_policy_input(name, knobs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        policies.get(name, **knobs)


def test_budget_below_fixed_part_names_the_minimum():
    with pytest.raises(ValueError, match=r"at least 5 tokens \(4 sink tokens \+ at least 1 recent token\)"):
        policies.get("streaming_llm").check_budget(4)
    with pytest.raises(ValueError, match="at least 33 tokens"):
        policies.get("snapkv").check_budget(32)


def test_preferred_policy_fits_the_budget():
    from kvscope.policies import preferred_for

    assert preferred_for(512) == "snapkv"
    assert preferred_for(33) == "snapkv"  # its 32-token window + 1
    assert preferred_for(32) == "lru" and preferred_for(1) == "lru"
