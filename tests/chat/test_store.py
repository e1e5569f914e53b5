"""The session store on a tiny random Llama (token ids, no tokenizer): one global KV budget, least-recently-used
eviction in exact order, what is charged equals what the caches allocate, and bad input that disturbs nothing."""

from __future__ import annotations

import pytest
import torch

from kvscope.chat import ChatEngine, SessionBusyError, StoreFullError, TooLongError, UnknownSessionError
from kvscope.errors import UsageError
from tests.conftest import TINY, build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_for(model, sessions: int = 2, **kw) -> ChatEngine:
    """An engine whose global budget holds exactly `sessions` sessions (a `full` cache has no room above its budget;
    an evicting one has a chunk of room)."""
    kw = {"session_budget": 64, "chunk_size": 16} | kw
    room = kw["chunk_size"] if kw.get("policy", "full") != "full" else 0
    return ChatEngine(model, None, budget_tokens=sessions * (kw["session_budget"] + room), **kw)


def test_idle_sessions_are_dropped_least_recently_used_first(tiny):
    engine = engine_for(tiny, sessions=2)
    a, b, c = (engine.open(x) for x in "abc")
    prompts = {s.id: ids(20, i) for i, s in enumerate((a, b, c))}
    first = {s.id: engine.generate_ids(s, prompts[s.id], max_new_tokens=4).ids for s in (a, b)}
    assert [s.state for s in (a, b, c)] == ["idle", "idle", "new"]
    engine.generate_ids(c, prompts["c"], max_new_tokens=4)  # no room: a (least recently used) is dropped
    assert [s.state for s in (a, b, c)] == ["dropped", "idle", "idle"]
    again = engine.generate_ids(a, prompts["a"], max_new_tokens=4)  # now b is the oldest
    assert [s.state for s in (a, b, c)] == ["idle", "dropped", "idle"]
    assert again.restore == "recompute" and again.reused_tokens == 0 and again.ids == first["a"]
    snap = engine.store.snapshot()
    assert snap.used_tokens <= snap.budget_tokens and snap.used_bytes <= snap.budget_bytes
    assert snap.totals.drops == 2 and a.counters.drops == 1 and b.counters.drops == 1 and c.counters.drops == 0


@pytest.mark.parametrize("kv_dtype", [None, "bf16", "fp8", "int8", "int4"])
def test_what_is_charged_is_what_the_cache_allocates(kv_dtype):
    model = build_tiny(dict(TINY, head_dim=64)) if kv_dtype == "int4" else build_tiny()
    engine = engine_for(model, sessions=3, kv_dtype=kv_dtype)
    session = engine.open()
    engine.generate_ids(session, ids(10, 1), max_new_tokens=3)  # a first forward shorter than a chunk
    stats = session.cache.stats()
    used = engine.store.used()
    assert used.bytes == session.cache.allocated_bytes == stats.bytes
    assert used.tokens == stats.layers[0].capacity_tokens == 64  # `full`: no room above the budget
    lru = engine_for(model, sessions=3, kv_dtype=kv_dtype, policy="lru")
    session = lru.open()
    lru.generate_ids(session, ids(10, 1), max_new_tokens=3)  # an evicting policy: room for the (short) first forward
    assert lru.store.used().bytes == session.cache.allocated_bytes
    assert lru.store.used().tokens == session.cache.stats().layers[0].capacity_tokens == 64 + 10


def test_a_store_full_of_active_sessions_refuses_and_disturbs_nothing(tiny):
    engine = engine_for(tiny, sessions=2)
    a, b, c = (engine.open(x) for x in "abc")
    engine.admit(a)
    engine.admit(b)
    before = engine.store.used()
    with pytest.raises(StoreFullError, match=r"full of active sessions: 2 busy session\(s\) hold 128 of 128 slots"):
        engine.admit(c)
    assert engine.store.used() == before and a.busy and b.busy and not c.busy and c.state == "new"
    engine.release(a)  # a never ran: its reservation is given back, and c fits
    engine.admit(c)
    assert a.state == "new" and c.busy and engine.store.used() == before


def test_one_turn_at_a_time_per_session(tiny):
    engine = engine_for(tiny)
    s = engine.open("s")
    engine.admit(s)
    with pytest.raises(SessionBusyError, match="one turn at a time"):
        engine.generate_ids(s, ids(5, 0), max_new_tokens=2)
    engine.release(s)
    engine.generate_ids(s, ids(5, 0), max_new_tokens=2)


def test_a_global_budget_too_small_for_one_session_names_the_minimum(tiny):
    with pytest.raises(UsageError, match=r"one session needs 64 KV slots .* at least 64 tokens"):
        ChatEngine(tiny, None, session_budget=64, chunk_size=16, budget_tokens=50)
    with pytest.raises(UsageError, match="below the minimum of policy 'snapkv'"):
        ChatEngine(tiny, None, policy="snapkv", session_budget=8)
    with pytest.raises(UsageError, match="unknown policy"):
        ChatEngine(tiny, None, policy="lfu")


def test_unknown_session_and_a_turn_too_long_leave_the_store_as_it_was(tiny):
    engine = engine_for(tiny)
    s = engine.open("kept")
    engine.generate_ids(s, ids(20, 3), max_new_tokens=4)
    held, used = list(s.ids), engine.store.used()
    with pytest.raises(UnknownSessionError, match=r"no session 'nope'; the store holds 1 session\(s\) \(e.g. 'kept'\)"):
        engine.session("nope")
    with pytest.raises(TooLongError, match=r"prompt has 63 tokens .* needs 78 KV tokens but its budget is 64 "):
        engine.generate_ids(s, s.ids + ids(40, 4), max_new_tokens=16)
    assert s.ids == held and engine.store.used() == used and s.state == "idle"
    assert engine.generate_ids(s, held + ids(5, 5), max_new_tokens=2).reused_tokens == len(held)


def test_evicting_policy_keeps_the_session_within_its_budget(tiny):
    engine = engine_for(tiny, policy="sliding_window", session_budget=32)
    s = engine.open()
    history = []
    for turn in range(4):
        history = history + ids(20, 10 + turn)
        r = engine.generate_ids(s, history, max_new_tokens=4)
        history = history + r.ids
    assert r.cached_tokens <= 32 and s.counters.evicted_tokens > 0 and r.reused_tokens > 32


@pytest.mark.gpu
def test_idle_sessions_swap_to_cpu_on_cuda_and_come_back_bit_exact():
    model = build_tiny().cuda()
    engine = engine_for(model, sessions=1)
    a, b = engine.open("a"), engine.open("b")
    pa = ids(20, 1)
    ra = engine.generate_ids(a, pa, max_new_tokens=4)
    engine.generate_ids(b, ids(20, 2), max_new_tokens=4)
    assert a.state == "swapped" and engine.store.snapshot().swapped_bytes > 0
    again = engine.generate_ids(a, pa + ra.ids, max_new_tokens=4)
    assert again.restore == "swap-in" and again.reused_tokens == len(pa) + len(ra.ids) - 1
    assert a.counters.swaps_out == 1 and a.counters.swaps_in == 1 and b.state == "swapped"


def test_a_session_with_recall_brings_back_what_its_turn_evicted(tiny):
    """A long turn under a small session budget: its chunks' evictions wait in CPU memory until the turn's end."""
    engine = engine_for(tiny, policy="snapkv", session_budget=40, chunk_size=16, recall="cpu")
    assert engine.config.recall == "cpu"
    session = engine.open("long")
    r = engine.generate_ids(session, ids(120, 1), max_new_tokens=3, ignore_eos=True)
    assert len(r.ids) == 3
    assert 0 < max(session.cache.recalled_tokens) <= 40 and session.cache.held_tokens() <= 40
    r = engine.generate_ids(session, session.ids + ids(60, 2), max_new_tokens=2, ignore_eos=True)
    assert r.reused_tokens > 0 and session.cache.held_tokens() <= 40


def test_recall_with_a_policy_that_reads_no_attention_is_refused(tiny):
    with pytest.raises(UsageError, match="reads no attention"):
        engine_for(tiny, policy="streaming_llm", recall="cpu")
