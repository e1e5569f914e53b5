"""BudgetedCache: same results as DynamicCache when nothing is evicted, bounded storage, padding, positions, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvscope import _compat, policies
from kvscope.cache import BudgetedCache, CacheFullError
from kvscope.cache.layer import BudgetedLayer
from kvscope.errors import UsageError
from kvscope.runtime import generate
from tests.conftest import build_tiny

ALL = policies.available()


def prompt(batch=2, length=40, pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        mask[0, :pad] = 0
        ids[0, :pad] = 0
    return ids, mask


def hf_generate(model, ids, mask, cache=None, new=12):
    kw = {_compat.cache_keyword(model): cache} if cache is not None else {}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True, **kw)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.mark.parametrize("chunk", [7, 512])
@pytest.mark.parametrize("policy", ALL)
def test_no_eviction_matches_dynamic_cache(tiny, policy, chunk):
    ids, mask = prompt()
    ref = hf_generate(tiny, ids, mask)
    cache = BudgetedCache(tiny, policy, budget_tokens=64, chunk_size=chunk)
    out = hf_generate(tiny, ids, mask, cache)
    assert torch.equal(ref.sequences, out.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits))
    assert diff < 1e-4
    assert cache.stats().evicted_tokens == 0


@pytest.fixture(scope="module")
def smollm_reference(smollm):
    """The embedded model's greedy output with the default cache, computed once for every policy."""
    model, tok, _ = smollm
    enc = tok(["The capital of France is", "Write a short poem about the sea and the wind:"], return_tensors="pt",
              padding=True, padding_side="left")
    return enc, hf_generate(model, enc.input_ids, enc.attention_mask, new=8)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ALL)
def test_no_eviction_matches_dynamic_cache_on_smollm(smollm, smollm_reference, policy):
    model = smollm[0]
    enc, ref = smollm_reference
    cache = BudgetedCache(model, policy, budget_tokens=64, chunk_size=5)
    out = hf_generate(model, enc.input_ids, enc.attention_mask, cache, new=8)
    assert torch.equal(ref.sequences, out.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ref.logits, out.logits)) < 1e-4


def test_kvscope_runtime_matches_generate(tiny):
    ids, mask = prompt()
    ref = hf_generate(tiny, ids, mask, new=10)
    cache = BudgetedCache(tiny, "full", budget_tokens=64, chunk_size=9)
    out = generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=10, chunk_size=9)
    assert torch.equal(ref.sequences[:, ids.shape[1]:], out.sequences)


@pytest.fixture
def bounded(monkeypatch):
    """Check after every chunk of every layer: no row above the budget, storage never reallocated."""
    seen = {"checks": 0}
    original = BudgetedLayer._chunk

    def checked(self, *args):
        before = self.store.nbytes
        out = original(self, *args)
        held = int(self.state.valid.sum(-1).max())
        assert held <= self.settings.budget_tokens, (held, self.settings.budget_tokens)
        assert self.store.nbytes == before
        budget = self.settings.budget_tokens
        assert self.store.keys.shape[2] == budget + self.room <= budget + self.settings.chunk_size
        seen["checks"] += 1
        return out

    monkeypatch.setattr(BudgetedLayer, "_chunk", checked)
    return seen


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from([p for p in ALL if p != "full"]), batch=st.integers(1, 3), chunk=st.integers(1, 20),
       budget=st.integers(1, 24), length=st.integers(1, 50), new=st.integers(1, 6), pad=st.integers(0, 4),
       evict_batch=st.integers(1, 4))
def test_stored_length_never_exceeds_budget(bounded, tiny, policy, batch, chunk, budget, length, new, pad, evict_batch):
    p = policies.get(policy)
    budget = max(budget, p.min_budget() + evict_batch - 1)
    ids, mask = prompt(batch, length, min(pad, length - 1))
    cache = BudgetedCache(tiny, p, budget_tokens=budget, chunk_size=chunk, evict_batch=evict_batch)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=new, chunk_size=max(1, chunk * 2))
    stats = cache.stats()
    assert stats.stored_tokens <= budget
    assert stats.seen_tokens == length + new - 1
    assert bounded["checks"] > 0


@pytest.mark.parametrize("policy", ["h2o", "sliding_window", "tova"])
def test_evict_batch_with_a_budget_sized_protected_part_stays_within_budget(bounded, tiny, policy):
    """h2o protects a share of the budget (recent_ratio): with evict_batch 4 it must protect a share of what stays (a
    case hypothesis found: budget 4 held 5 tokens)."""
    ids, mask = prompt(1, 3, 0)
    cache = BudgetedCache(tiny, policy, budget_tokens=4, chunk_size=2, evict_batch=4)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=6, chunk_size=4)
    assert cache.stats().stored_tokens <= 4 and bounded["checks"] > 0


def test_evict_batch_evicts_less_often_and_stays_within_budget(tiny):
    ids, mask = prompt(batch=1, length=20, pad=0)
    one = BudgetedCache(tiny, "sliding_window", budget_tokens=16, chunk_size=4)
    eight = BudgetedCache(tiny, "sliding_window", budget_tokens=16, chunk_size=4, evict_batch=8)
    for c in (one, eight):
        generate(tiny, ids, c, attention_mask=mask, max_new_tokens=24, chunk_size=4)
    a, b = one.stats().layers[0], eight.stats().layers[0]
    assert a.stored_tokens == 16 and 9 <= b.stored_tokens <= 16
    assert b.evictions < a.evictions / 3
    with pytest.raises(ValueError, match="evict_batch 14 would cut below the minimum of policy 'streaming_llm'"):
        BudgetedCache(tiny, "streaming_llm", budget_tokens=16, evict_batch=14)


def test_padding_is_never_stored(tiny):
    ids, mask = prompt(batch=2, length=30, pad=10)
    cache = BudgetedCache(tiny, "full", budget_tokens=64, chunk_size=8)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=5)
    held = cache.layers[0].state.valid.sum(-1)  # [B, H]
    assert held[0].tolist() == [20 + 4] * 2  # 20 real prompt tokens + 4 decoded ones (the 5th is never fed back)
    assert held[1].tolist() == [30 + 4] * 2


def test_padding_is_evicted_before_real_tokens(tiny):
    # a heavily padded row under a tight budget keeps only real tokens
    ids, mask = prompt(batch=2, length=30, pad=20)
    cache = BudgetedCache(tiny, "h2o", budget_tokens=8, chunk_size=4)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3)
    st0 = cache.layers[1].state
    kept_positions = st0.position[0][st0.valid[0]]
    assert kept_positions.max() <= 10 + 2  # positions of row 0 run 0..9 for real tokens, then decode
    assert int(st0.valid[0].sum(-1).max()) <= 8


def test_keys_keep_true_positions_and_attention_matches_masked_reference(tiny):
    """After eviction the model sees full attention with the evicted tokens masked out: compare with a plain
    forward of the same model under the equivalent 4-D mask (no cache)."""
    n, budget, chunk = 24, 6, 4
    ids, _ = prompt(batch=1, length=n, pad=0)
    cache = BudgetedCache(tiny, "sliding_window", budget_tokens=budget, chunk_size=chunk)
    with torch.inference_mode():
        got = tiny(input_ids=ids, use_cache=True, **{_compat.cache_keyword(tiny): cache}).logits
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        c0 = (i // chunk) * chunk
        allowed[i, max(0, c0 - budget):c0] = True  # the window kept before this chunk
        allowed[i, c0:i + 1] = True  # causal within the chunk
    with torch.inference_mode():
        ref = tiny(input_ids=ids, attention_mask=allowed[None, None], use_cache=False).logits
    assert (got - ref).abs().max() < 1e-4
    st0 = cache.layers[0].state
    assert sorted(st0.position[0, 0][st0.valid[0, 0]].tolist()) == list(range(n - budget, n))


def test_full_policy_overflow_is_an_error(tiny):
    ids, mask = prompt(batch=1, length=30, pad=0)
    cache = BudgetedCache(tiny, "full", budget_tokens=16, chunk_size=8)
    with pytest.raises(CacheFullError, match=r"needs 31 KV tokens .* \(0 held \+ 30 prompt \+ 2 new - 1.* is 16"):
        generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=2)
    assert not cache.layers[0].is_initialized  # refused before any work
    # with the check off (the doctor watches the overflow happen), the layer refuses mid-prefill
    with pytest.raises(CacheFullError, match="needs 30 KV tokens but the budget is 16"):  # no room above a full budget
        generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=2, check_fit=False)
    assert isinstance(CacheFullError("x"), ValueError)


def test_byte_budget_is_split_across_layers(tiny):
    # tiny: 2 layers, 2 KV heads, head_dim 16, fp32 -> 2*2*16*4 = 256 bytes per token per layer
    cache = BudgetedCache(tiny, "lru", budget_bytes=256 * 2 * 10 * 2, kv_dtype="fp32")
    ids, mask = prompt(batch=2, length=12)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=2)
    assert cache.budget_tokens == 10


@pytest.mark.parametrize("kwargs,message", [
    ({"budget_tokens": 0}, "budget_tokens must be a whole number >= 1, got 0"),
    ({"budget_tokens": -5}, "budget_tokens must be a whole number >= 1"),
    ({"budget_tokens": 2.5}, "budget_tokens must be a whole number"),
    ({}, "give exactly one of budget_tokens and budget_bytes"),
    ({"budget_tokens": 8, "budget_bytes": 100}, "give exactly one"),
    ({"budget_bytes": 100}, "a byte budget of 100 bytes holds no token; expected at least 256 bytes"),
    ({"budget_tokens": 4, "policy": "streaming_llm"}, r"at least 5 tokens \(4 sink tokens"),
    ({"budget_tokens": 8, "policy": "bogus"}, "unknown policy 'bogus'"),
    ({"budget_tokens": 8, "kv_dtype": "int3"}, "unknown KV dtype 'int3'"),
    ({"budget_tokens": 8, "chunk_size": 0}, "chunk_size must be"),
])
def test_bad_arguments_are_value_errors(tiny, kwargs, message):
    kwargs = {"policy": "lru", **kwargs}
    policy = kwargs.pop("policy")
    with pytest.raises(ValueError, match=message):
        BudgetedCache(tiny, policy, kv_dtype=kwargs.pop("kv_dtype", "bf16" if "budget_bytes" in kwargs else None),
                      **kwargs)


def test_empty_prompt_is_a_usage_error(tiny):
    cache = BudgetedCache(tiny, "lru", budget_tokens=8)
    with pytest.raises(UsageError, match="the prompt is empty"):
        generate(tiny, torch.zeros(1, 0, dtype=torch.long), cache)


def test_stats_take_and_reset_and_collector(tiny):
    events = []
    ids, mask = prompt(batch=1, length=40, pad=0)
    cache = BudgetedCache(tiny, "streaming_llm", budget_tokens=10, chunk_size=8, collector=events.append)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=4)
    taken = cache.take_stats()
    assert taken.evicted_tokens == 2 * (43 - 10)  # two layers, 43 tokens stored in all, 10 kept
    layer = taken.layers[0]
    assert layer.stored_tokens == 10 and layer.capacity_tokens == 18
    assert layer.evicted_position_min == 4  # the 4 sinks are never evicted
    assert layer.bytes == 2 * 2 * 18 * 16 * 4 * 1  # K+V, 2 heads, 18 slots, head_dim 16, fp32
    assert cache.stats().evicted_tokens == 0  # counters were reset; stored tokens are a level
    assert cache.stats().stored_tokens == 10
    assert events and {e.layer for e in events} == {0, 1}
    assert all(min(e.evicted_positions) >= 4 for e in events)


def test_model_is_left_unchanged_after_a_budgeted_run(tiny):
    ids, mask = prompt()
    before = hf_generate(tiny, ids, mask)
    generate(tiny, ids, BudgetedCache(tiny, "tova", budget_tokens=8, chunk_size=4), attention_mask=mask,
             max_new_tokens=3)
    assert _compat.attention_implementation(tiny) == "sdpa"
    after = hf_generate(tiny, ids, mask)
    assert torch.equal(before.sequences, after.sequences)


@pytest.mark.parametrize("policy,knobs", [("snapkv", {"window": 12, "kernel": 3}), ("h2o", {}), ("lru", {})])
def test_observation_in_blocks_scores_like_one_block(tiny, monkeypatch, policy, knobs):
    """At long contexts the layer observes a chunk's rows a few at a time (its [rows, slots] matrix is bounded): the
    policy's scores and so its evictions must not depend on the block size. snapkv once kept only the last block."""
    import kvscope.cache.layer as layer_module

    ids, mask = prompt(batch=2, length=48)

    def scores(block):
        monkeypatch.setattr(layer_module, "OBSERVE_BLOCK", block)
        cache = BudgetedCache(tiny, policy, budget_tokens=30, chunk_size=48, **knobs)
        generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3, chunk_size=48)
        return [layer.state.score.clone() for layer in cache.layers], [layer.state.valid.clone() for layer in
                                                                        cache.layers]

    one, one_valid = scores(128)
    for block in (5, 1):  # a block of one row must not be taken for a decode step
        many, many_valid = scores(block)
        for a, b, va, vb in zip(one, many, one_valid, many_valid):
            assert torch.equal(va, vb)
            torch.testing.assert_close(a[va], b[vb], rtol=1e-5, atol=1e-7)


def test_one_allocation_for_every_layer(tiny):
    cache = BudgetedCache(tiny, "lru", budget_tokens=20, chunk_size=8)
    ids, mask = prompt(batch=2, length=30)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3, chunk_size=8)
    arena = cache.settings.arena
    storages = {t.untyped_storage().data_ptr() for layer in cache.layers
                for t in [*layer.store.tensors().values(), layer.state.valid, layer.state.position,
                          layer.state.score, layer.state.newest, layer.queue]}
    assert storages == {arena.buffer.untyped_storage().data_ptr()}
    assert arena.nbytes == cache.allocation_bytes(2, torch.float32, 8)
    assert all(layer.capacity == 20 + 8 for layer in cache.layers)


@pytest.mark.parametrize("kv", ["int8", "fp8"])  # int4 needs head_dim 64: tests/cache/test_quant.py on the GPU
def test_a_quantized_cache_reads_into_one_buffer_of_its_allocation(tiny, kv, monkeypatch):
    """Every layer's read gets the same [2, B, H, slots, D] buffer of the cache's allocation (kvscope.kvformats
    .READ_BUFFER): no layer's dequantized keys and values come from a fresh allocation."""
    from kvscope.cache import quant
    from kvscope.kvformats import READ_BUFFER

    cache = BudgetedCache(tiny, "full", budget_tokens=64, kv_dtype=kv)
    given = []
    store = quant._PerTokenStore  # int8 and fp8 share its read
    read = store.read

    def spy(self, upto, dtype, out=None):
        given.append(out)
        return read(self, upto, dtype, out)

    monkeypatch.setattr(store, "read", spy)
    ids, mask = prompt(batch=2, length=30)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3, chunk_size=8)
    buffer = cache.settings.arena.views[READ_BUFFER]
    assert buffer.shape == (2, 2, cache.kv_heads, cache.layers[0].capacity, cache.head_dim)
    assert buffer.untyped_storage().data_ptr() == cache.settings.arena.buffer.untyped_storage().data_ptr()
    assert given and all(out is buffer for out in given)
    assert cache.settings.arena.nbytes == cache.allocation_bytes(2, torch.float32, 8)


@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_a_moved_arena_has_every_tensor_but_the_read_buffer(kv):
    """A swap (Arena.moved) copies every tensor bit for bit and leaves out the read buffer, scratch of every read."""
    from kvscope.cache.arena import Arena
    from kvscope.kvformats import READ_BUFFER, cache_layout

    arena = Arena(cache_layout(2, 3, 2, 64, kv, "bf16", 40, 8), "cpu")
    arena.buffer.copy_(torch.randint(0, 256, arena.buffer.shape, dtype=torch.uint8))
    moved = arena.moved("cpu")
    assert moved.specs == arena.specs and moved.nbytes == arena.nbytes
    same = {name: torch.equal(moved.views[name].reshape(-1).view(torch.uint8),
                              arena.views[name].reshape(-1).view(torch.uint8)) for name in arena.views}
    assert all(ok for name, ok in same.items() if name != READ_BUFFER)
    assert (READ_BUFFER in same) == (kv == "int8")
    read = arena.views.get(READ_BUFFER)
    assert moved.swap_bytes == arena.nbytes - (0 if read is None else read.nbytes)


def test_a_dense_cache_has_no_read_buffer(tiny):
    from kvscope.kvformats import READ_BUFFER

    cache = BudgetedCache(tiny, "full", budget_tokens=64)
    ids, mask = prompt(batch=2, length=30)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3, chunk_size=8)
    assert READ_BUFFER not in cache.settings.arena.views


def test_a_policy_that_never_evicts_has_no_room_above_its_budget(tiny):
    cache = BudgetedCache(tiny, "full", budget_tokens=50, chunk_size=8)
    ids, mask = prompt(batch=1, length=30, pad=0)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3, chunk_size=8)
    assert all(layer.capacity == 50 for layer in cache.layers)


def test_deleting_a_cache_frees_it_at_once_and_unhooks_the_model():
    import gc
    import weakref

    model = build_tiny()
    gc.disable()  # nothing may depend on the cycle collector
    try:
        cache = BudgetedCache(model, "lru", budget_tokens=16)
        other = BudgetedCache(model, "full", budget_tokens=64)
        generate(model, prompt(batch=1, length=20, pad=0)[0], cache, max_new_tokens=2)
        assert _compat.forward_hooks_held(model) == 2
        buffer = weakref.ref(cache.settings.arena.buffer)
        ref = weakref.ref(cache)
        del cache
        assert ref() is None and buffer() is None
        assert _compat.forward_hooks_held(model) == 1
        del other
        assert _compat.forward_hooks_held(model) == 0
        assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    finally:
        gc.enable()


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
@pytest.mark.parametrize("policy,budget", [("full", 60), ("lru", 20), ("snapkv", 40)])
def test_the_planner_prices_the_allocation_to_the_byte(tiny, policy, budget, kv_dtype):
    from kvscope.models.spec import ModelSpec
    from kvscope.planner.memory import kvscope_cache_bytes
    from kvscope.planner.workload import Workload
    from tests.conftest import TINY

    cache = BudgetedCache(tiny, policy, budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=8)
    ids, mask = prompt(batch=2, length=30)
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=3, chunk_size=8)
    w = Workload(batch=2, context=30, new_tokens=3, dtype="fp32", kv_dtype=kv_dtype, runtime="kvscope",
                 budget_tokens=budget, chunk_size=8, policy=policy)
    assert cache.settings.arena.nbytes == kvscope_cache_bytes(ModelSpec.from_hf_config(TINY), w)


@pytest.mark.parametrize("policy,switch", [("lru", None), ("snapkv", None), ("full", "knorm"), ("full", "random")])
def test_compress_to_equals_a_one_chunk_prefill_under_that_budget(tiny, policy, switch):
    ids, mask = prompt(batch=2, length=40)
    big = BudgetedCache(tiny, policy, budget_tokens=60, chunk_size=40)
    generate(tiny, ids, big, attention_mask=mask, max_new_tokens=1, chunk_size=40)
    small = big.compress_to(34, switch)
    direct = BudgetedCache(tiny, switch or policy, budget_tokens=34, chunk_size=40)
    generate(tiny, ids, direct, attention_mask=mask, max_new_tokens=1, chunk_size=40)

    def held(cache):
        return [sorted(layer.state.position[r, h][layer.state.valid[r, h]].tolist()) for layer in cache.layers
                for r in range(2) for h in range(2)]

    assert held(small) == held(direct) and held(big) != held(small)
    assert big.budget_tokens == 60 and big.policy.name == policy  # the original is untouched
    more = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(9))
    assert generate(tiny, more, small, max_new_tokens=6).sequences.tolist() == \
        generate(tiny, more, direct, max_new_tokens=6).sequences.tolist()


def test_compress_to_refuses_a_policy_that_reads_attention(tiny):
    cache = BudgetedCache(tiny, "full", budget_tokens=60)
    generate(tiny, prompt(batch=1, length=20, pad=0)[0], cache, max_new_tokens=1)
    with pytest.raises(UsageError, match="reads no attention"):
        cache.compress_to(10, "h2o")
