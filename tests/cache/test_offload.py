"""Offload and swap: refused / no-op without CUDA (CPU tests), exact on a GPU (opt-in: pytest --gpu)."""

from __future__ import annotations

import pytest
import torch

from kvscope.cache import BudgetedCache
from kvscope.runtime import generate
from tests.cache.test_budgeted import prompt
from tests.conftest import TINY, build_tiny

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_offload_refused_without_cuda():
    model = build_tiny()
    with pytest.raises(ValueError, match="KV offload needs a CUDA device.*drop offload=True"):
        BudgetedCache(model, "lru", budget_tokens=16, offload=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_swap_is_a_noop_that_says_so_without_cuda():
    model = build_tiny()
    cache = BudgetedCache(model, "lru", budget_tokens=16)
    assert "empty" in cache.swap_out().note
    ids, mask = prompt(batch=1, length=20, pad=0)
    generate(model, ids, cache, attention_mask=mask, max_new_tokens=2)
    report = cache.swap_out()
    assert report.bytes == 0 and "no CUDA device" in report.note and "no-op" in report.note
    assert cache.swap_in().bytes == 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("policy", ["full", "h2o", "streaming_llm"])
@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_offload_gives_the_same_tokens_as_resident(policy, kv_dtype):
    config = TINY | {"head_dim": 64} if kv_dtype == "int4" else None  # int4 packs head_dim in groups of 64
    model = build_tiny(config, dtype=torch.float32).cuda()
    ids, mask = prompt(batch=2, length=60, pad=5)
    ids, mask = ids.cuda(), mask.cuda()
    budget = 128 if policy == "full" else 24
    a = BudgetedCache(model, policy, budget_tokens=budget, chunk_size=16, kv_dtype=kv_dtype)
    b = BudgetedCache(model, policy, budget_tokens=budget, chunk_size=16, kv_dtype=kv_dtype, offload=True)
    ga = generate(model, ids, a, attention_mask=mask, max_new_tokens=20, chunk_size=16)
    gb = generate(model, ids, b, attention_mask=mask, max_new_tokens=20, chunk_size=16)
    assert torch.equal(ga.sequences, gb.sequences)
    assert b.gpu_resident_bytes == 2 * b.layers[0].store.nbytes
    assert b.stats().evicted_tokens == a.stats().evicted_tokens


@pytest.mark.gpu
@needs_cuda
def test_offload_with_an_odd_number_of_layers():
    """Layer 0 follows the last layer in the same staging buffer when the count is odd: it must not be prefetched
    over the last layer while that one computes."""
    model = build_tiny(TINY | {"num_hidden_layers": 3}, dtype=torch.float32).cuda()
    ids, mask = prompt(batch=2, length=40, pad=3)
    ids, mask = ids.cuda(), mask.cuda()
    a = BudgetedCache(model, "sliding_window", budget_tokens=24, chunk_size=16)
    b = BudgetedCache(model, "sliding_window", budget_tokens=24, chunk_size=16, offload=True)
    ga = generate(model, ids, a, attention_mask=mask, max_new_tokens=16, chunk_size=16)
    gb = generate(model, ids, b, attention_mask=mask, max_new_tokens=16, chunk_size=16)
    assert torch.equal(ga.sequences, gb.sequences)


def test_int4_offload_plan_copies_ring_and_markers_until_a_flush():
    from kvscope.cache.quant_int4 import Int4Store

    store = Int4Store(1, 2, 300, 64, torch.float32, "cpu")
    x = torch.randn(1, 2, 100, 64)
    store.write_range(0, x, x)  # fits the 128-token ring: no flush
    assert store.offload_plan() == {"residual": None, "value_params": 2}
    store.write_range(100, x, x)  # overflows the ring: a flush re-quantizes codes and key groups
    assert store.offload_plan() == dict.fromkeys(store.TENSORS)
    assert store.offload_plan() == {"residual": None, "value_params": 2}  # once copied, back to the small plan


@pytest.mark.gpu
@needs_cuda
def test_swap_round_trip_is_bit_exact_and_generation_continues():
    model = build_tiny(dtype=torch.bfloat16).cuda()
    ids, mask = prompt(batch=2, length=40, pad=3)
    ids, mask = ids.cuda(), mask.cuda()
    ref = BudgetedCache(model, "h2o", budget_tokens=20, chunk_size=8)
    cache = BudgetedCache(model, "h2o", budget_tokens=20, chunk_size=8)
    for c in (ref, cache):
        generate(model, ids, c, attention_mask=mask, max_new_tokens=1, chunk_size=8)
    before = {i: {k: v.clone() for k, v in layer.store.tensors().items()} for i, layer in enumerate(cache.layers)}
    out = cache.swap_out()
    assert out.bytes > 0 and cache.layers[0].store.keys.device.type == "cpu" and cache.gpu_resident_bytes == 0
    back = cache.swap_in()
    assert back.bytes == out.bytes and back.gb_per_second > 0
    for i, layer in enumerate(cache.layers):
        for k, v in layer.store.tensors().items():
            assert v.device.type == "cuda" and torch.equal(v, before[i][k])
    assert torch.equal(ref.layers[1].state.valid, cache.layers[1].state.valid)
