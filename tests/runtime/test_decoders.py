"""kvscope's own decode step against the model's forward: the same tokens, the same kept tokens, for every policy."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvscope import policies
from kvscope.cache import BudgetedCache, static
from kvscope.runtime import generate
from kvscope.runtime.step import DecodeStep
from tests.conftest import TINY, build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def batch(length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    return ids, mask


def kept(cache) -> list[list[list[int]]]:
    """Per layer and row: the sorted true positions held by KV head 0."""
    return [[sorted(layer.state.position[r, 0][layer.state.valid[r, 0]].tolist()) for r in range(2)]
            for layer in cache.layers]


def both(model, policy, kv_dtype=None, budget=16, evict_batch=1, new=14):
    ids, mask = batch()
    out = {}
    for mode in ("forward", "static"):
        cache = BudgetedCache(model, policy, budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=8,
                              evict_batch=evict_batch)
        gen = generate(model, ids, cache, attention_mask=mask, max_new_tokens=new, chunk_size=8, decode=mode)
        out[mode] = (gen.sequences.tolist(), kept(cache), cache.stats().evicted_tokens, cache.get_seq_length())
    return out


@pytest.mark.parametrize("policy", policies.available())
def test_static_step_keeps_what_the_forward_keeps(tiny, policy, monkeypatch):
    calls = []
    original = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self: calls.append(1) or original(self))
    budget = 40 if policy == "full" else max(16, policies.get(policy).min_budget() + 2)
    out = both(tiny, policy, budget=budget)
    assert out["static"] == out["forward"]
    assert len(calls) == 13  # the static run really ran kvscope's step: 14 new tokens, 13 decode steps
    assert policy == "full" or out["static"][2] > 0  # and evicted


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", "bf16"])
@pytest.mark.parametrize("policy", ["lru", "h2o", "streaming_llm"])
def test_static_step_with_quantized_stores_and_evict_batch(tiny, kv_dtype, policy):
    out = both(tiny, policy, kv_dtype=kv_dtype, budget=14, evict_batch=3)
    assert out["static"] == out["forward"]


def test_static_step_continues_and_hands_back_to_the_eager_path(tiny):
    ids, mask = batch(seed=3)
    more = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    results = []
    for mode in ("forward", "static"):
        cache = BudgetedCache(tiny, "lru", budget_tokens=20, chunk_size=8)
        first = generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=9, decode=mode)
        second = generate(tiny, more, cache, max_new_tokens=9, decode=mode)  # eager prefill after a static decode
        results.append((first.sequences.tolist(), second.sequences.tolist(), kept(cache)))
    assert results[0] == results[1]


def test_static_step_matches_plain_generate_on_the_embedded_model(smollm):
    model, tok, _ = smollm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    for mode in ("forward", "static"):
        cache = BudgetedCache(model, "full", budget_tokens=64)
        assert generate(model, ids, cache, max_new_tokens=16, decode=mode).sequences[0].tolist() == ref


def test_int4_decodes_through_the_forward_with_a_warning():
    ids, mask = batch()
    cfg_model = build_tiny({**TINY, "head_dim": 64, "hidden_size": 256})  # int4 packs 64-channel groups
    cache = BudgetedCache(cfg_model, "lru", budget_tokens=16, kv_dtype="int4", chunk_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(cfg_model, ids, cache, attention_mask=mask, max_new_tokens=4, decode="static")
    assert any("ring position" in str(w.message) for w in caught)


def test_unknown_decode_mode(tiny):
    from kvscope.errors import UsageError

    with pytest.raises(UsageError, match="decode mode"):
        generate(tiny, batch()[0], BudgetedCache(tiny, "lru", budget_tokens=16), max_new_tokens=2, decode="fast")


def test_a_dense_cache_stays_dense_through_static_decode_and_rewind(tiny):
    """Chat turns: prefill, decode with kvscope's step, rewind, prefill again: the cache keeps filling in order, so
    prefill attention stays plain causal attention (no mask) and gives the same tokens as the forward path."""
    a = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    b = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    out = []
    for mode in ("forward", "static"):
        cache = BudgetedCache(tiny, "full", budget_tokens=120, chunk_size=8)
        first = generate(tiny, a, cache, max_new_tokens=10, decode=mode)
        assert all(layer.dense and layer.fill == 39 for layer in cache.layers)
        cache.rewind(35)
        assert all(layer.dense and layer.fill == 35 for layer in cache.layers)
        second = generate(tiny, b, cache, max_new_tokens=10, decode=mode)
        assert all(layer.dense for layer in cache.layers)
        out.append((first.sequences.tolist(), second.sequences.tolist()))
    assert out[0] == out[1]


def test_stacked_projections_on_the_cpu():
    from kvscope import _compat

    plain, fused = build_tiny(), build_tiny()
    before = sum(p.numel() for p in fused.parameters())
    assert _compat.fuse_projections(fused)
    assert sum(p.numel() for p in fused.parameters()) == before  # views: the same weights, no second copy
    w = _compat.decode_weights(fused).layers[0]
    assert w.qkv is not None and w.gate_up is not None and w.qkv.shape == (4 * 16 + 2 * 2 * 16, 64)
    ids, mask = batch()
    for policy in ("full", "h2o"):
        out = []
        for model in (plain, fused):
            cache = BudgetedCache(model, policy, budget_tokens=40 if policy == "full" else 16, chunk_size=8)
            out.append(generate(model, ids, cache, attention_mask=mask, max_new_tokens=10, decode="static")
                       .sequences.tolist())
        assert out[0] == out[1]


@pytest.mark.parametrize("policy, evict_batch", [("lru", 1), ("snapkv", 4), ("streaming_llm", 3)])
def test_a_compacted_cache_decodes_within_budget_plus_one_slots(tiny, policy, evict_batch, monkeypatch):
    """After a chunked prefill that evicted, tokens sit anywhere in budget + chunk slots; the static decode compacts
    them and then reads budget + 1 slots a step, and no token of any row ever lies above that (what it reads is
    everything there is), over enough steps to evict and refill the queue several times."""
    budget = max(16, policies.get(policy).min_budget() + evict_batch + 1)
    highest, original = [], DecodeStep.__call__

    def watched(self):
        out = original(self)
        for layer in self.layers:
            held = layer.state.valid.nonzero()
            highest.append((int(held[:, -1].max()) if held.numel() else -1, layer.decode_width))
        return out

    monkeypatch.setattr(DecodeStep, "__call__", watched)
    out = both(tiny, policy, budget=budget, evict_batch=evict_batch, new=40)
    assert out["static"] == out["forward"]
    assert highest and all(width == budget + 1 for _, width in highest)
    assert all(top < width for top, width in highest)


def test_compacting_moves_no_token(tiny):
    """Compaction permutes slots: the same positions, keys, values and scores, now in the lowest slots."""
    ids, mask = batch(length=40)
    cache = BudgetedCache(tiny, "random", budget_tokens=16, chunk_size=8)  # survivors anywhere in the 24 slots
    generate(tiny, ids, cache, attention_mask=mask, max_new_tokens=1, chunk_size=8)
    layer = cache.layers[1]
    st = layer.state

    def by_position():
        k, v = layer.store.read(layer.capacity, torch.float32)
        return {(r, h, int(st.position[r, h, s])): (k[r, h, s].clone(), v[r, h, s].clone(), float(st.score[r, h, s]))
                for r, h, s in st.valid.nonzero().tolist()}

    before = by_position()
    assert int(st.valid.nonzero()[:, -1].max()) >= 16  # the prefill left tokens above the budget's slots
    with torch.inference_mode():  # the cache's tensors were made under inference mode, as generate() runs
        static.compact(layer)
    after = by_position()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[p][0], after[p][0]) and torch.equal(before[p][1], after[p][1])
               and before[p][2] == after[p][2] for p in before)
    held = st.valid.sum(-1)
    assert all(bool(st.valid[r, h, :held[r, h]].all()) for r in range(2) for h in range(held.shape[1]))
