"""CUDA-graph decode (kvscope.runtime.decoders.GraphDecoder) against kvscope's step run eagerly and the model's
forward: the same tokens and the same kept tokens, graphs reused across generations, memory freed on `del`."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from kvscope import policies
from kvscope.cache import BudgetedCache
from kvscope.runtime import generate
from tests.conftest import TINY, build_tiny

pytestmark = pytest.mark.gpu

SHAPE = {**TINY, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512}


@pytest.fixture(scope="module")
def models():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return {dtype: build_tiny(SHAPE, dtype=dtype).cuda() for dtype in (torch.float32, torch.bfloat16)}


def batch(length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    return ids.cuda(), mask.cuda()


def kept(cache):
    return [[sorted(layer.state.position[r, h][layer.state.valid[r, h]].tolist()) for r in range(2) for h in range(2)]
            for layer in cache.layers]


def run(model, mode, policy, kv_dtype=None, budget=24, evict_batch=1, new=40, cache=None):
    ids, mask = batch()
    cache = cache or BudgetedCache(model, policy, budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=16,
                                   evict_batch=evict_batch)
    gen = generate(model, ids, cache, attention_mask=mask, max_new_tokens=new, chunk_size=16, decode=mode)
    return gen.sequences.tolist(), kept(cache), cache.stats().evicted_tokens


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
@pytest.mark.parametrize("policy", policies.available())
def test_graph_equals_static_bit_for_bit_and_forward_in_fp32(models, policy, kv_dtype):
    budget = 80 if policy == "full" else max(24, policies.get(policy).min_budget() + 4)
    for dtype, model in models.items():
        graph = run(model, "graph", policy, kv_dtype, budget)
        assert graph == run(model, "static", policy, kv_dtype, budget)
        if dtype == torch.float32:
            assert graph == run(model, "forward", policy, kv_dtype, budget)
        assert policy == "full" or graph[2] > 0


@pytest.mark.parametrize("policy", ["lru", "snapkv", "streaming_llm"])
def test_evict_batch_in_graphs(models, policy):
    model = models[torch.float32]
    budget = max(40, policies.get(policy).min_budget() + 12)
    assert run(model, "graph", policy, budget=budget, evict_batch=8) == \
        run(model, "forward", policy, budget=budget, evict_batch=8)


def test_graphs_are_reused_by_the_next_generation_with_the_same_cache(models):
    model = models[torch.bfloat16]
    cache = BudgetedCache(model, "lru", budget_tokens=24, chunk_size=16)
    first = run(model, "graph", "lru", cache=cache)
    graph = cache.decode_graphs[2]["step"].graph
    assert graph is not None
    cache.reset()
    again = run(model, "graph", "lru", cache=cache)
    assert cache.decode_graphs[2]["step"].graph is graph  # replayed, not captured again
    assert again == first


def _live_blocks():
    """Allocated block sizes -> count, from the allocator's snapshot."""
    from collections import Counter

    return Counter(b["size"] for seg in torch.cuda.memory_snapshot() for b in seg["blocks"]
                   if b["state"] == "active_allocated")


def test_deleting_a_cache_frees_its_gpu_memory_at_once(models):
    """Everything a cache allocated goes with it. A first cache of the same shapes runs before the baseline: the
    kernels' small per-process constants (the decode kernel's strides tensor for these shapes, 512 bytes) are made
    once and shared by every cache after it."""
    model = models[torch.bfloat16]
    run(model, "graph", "lru", cache=BudgetedCache(model, "lru", budget_tokens=2048, chunk_size=16), new=8)
    gc.collect()
    torch.cuda.empty_cache()
    before, baseline = torch.cuda.memory_allocated(), _live_blocks()
    gc.disable()
    try:
        cache = BudgetedCache(model, "lru", budget_tokens=2048, chunk_size=16)
        run(model, "graph", "lru", cache=cache, new=8)
        arena = cache.settings.arena.nbytes
        assert torch.cuda.memory_allocated() > before + arena // 2
        del cache
        left = _live_blocks() - baseline  # what is allocated now and was not before, for the message
        assert torch.cuda.memory_allocated() == before, (arena, sorted(left.items(), key=lambda kv: -kv[0])[:8])
    finally:
        gc.enable()


def test_int4_falls_back_to_the_forward_with_one_warning(models):
    model = models[torch.bfloat16]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(model, "auto", "lru", kv_dtype="int4", budget=130, new=6)
    assert any("ring position" in str(w.message) for w in caught)
    assert len(out[0][0]) == 6


def test_continuing_after_graph_decode(models):
    model = models[torch.float32]
    more = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    results = []
    for mode in ("graph", "forward"):
        cache = BudgetedCache(model, "h2o", budget_tokens=30, chunk_size=16)
        a = run(model, mode, "h2o", cache=cache, new=20)
        b = generate(model, more, cache, max_new_tokens=20, decode=mode).sequences.tolist()
        results.append((a, b, kept(cache)))
    assert results[0] == results[1]


def test_a_cache_larger_than_the_gpu_is_refused_before_any_work(models):
    from kvscope.errors import UsageError

    model = models[torch.bfloat16]
    total = torch.cuda.get_device_properties(0).total_memory
    per_token = 3 * 2 * 2 * 64 * 2  # layers x (K, V) x KV heads x head_dim x bf16
    budget = 2 * total // (2 * per_token)  # twice the GPU for 2 rows
    cache = BudgetedCache(model, "lru", budget_tokens=budget, chunk_size=16)
    before = torch.cuda.memory_allocated()
    with pytest.raises(UsageError, match=r"the KV cache needs .* GPU has .* free"):
        run(model, "graph", "lru", cache=cache, new=4)
    assert torch.cuda.memory_allocated() == before and not cache.layers[0].is_initialized


def test_a_failed_capture_falls_back_to_eager_with_one_warning(models, monkeypatch):
    model = models[torch.float32]
    expected = run(model, "forward", "h2o")

    def broken(self, *a, **k):
        raise RuntimeError("capture not permitted here")

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(model, "graph", "h2o") == expected
    assert sum("capture failed" in str(w.message) for w in caught) == 1


def test_an_oom_in_a_capture_after_the_side_stream_forked_comes_out_as_an_oom(models, monkeypatch):
    """lru's observation forks a second stream in every layer; an OOM in a later layer of a capture still reaches the
    caller as an OOM (the doctor reads it), not as a capture that failed on an unjoined stream."""
    from kvscope.cache import static

    model = models[torch.float32]
    original = static.insert

    def insert(layer, *args, **kwargs):
        if layer.index == 1 and torch.cuda.is_current_stream_capturing():
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(static, "insert", insert)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(torch.OutOfMemoryError, match="test"):
            run(model, "graph", "lru")
    assert not any("capture failed" in str(w.message) for w in caught)


def test_dense_prefill_and_graph_decode_match_plain_generate_in_fp32(models):
    model = models[torch.float32]
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(3)).cuda()  # no padding
    ref = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[:, 300:].tolist()
    cache = BudgetedCache(model, "full", budget_tokens=400, chunk_size=64)
    out = generate(model, ids, cache, max_new_tokens=24, chunk_size=64, decode="graph")
    assert out.sequences.tolist() == ref
    assert all(layer.dense for layer in cache.layers)


def test_stacked_projections_decode_as_the_separate_ones(models):
    from kvscope import _compat

    fused = build_tiny(SHAPE, dtype=torch.float32).cuda()
    assert _compat.fuse_projections(fused) and _compat.decode_weights(fused).layers[0].qkv is not None
    plain = models[torch.float32]
    assert _compat.decode_weights(plain).layers[0].qkv is None
    for policy, budget in (("full", 80), ("lru", 24)):  # full never evicts: room for the prompt and every new token
        assert run(fused, "graph", policy, budget=budget) == run(plain, "graph", policy, budget=budget) == \
            run(fused, "forward", policy, budget=budget)


def test_the_side_stream_is_made_before_the_cache_and_once_per_device(models, monkeypatch):
    """Making the first CUDA stream takes memory outside PyTorch's allocator: generate() asks for the decode step's
    second stream before it allocates the cache, and every step on a device shares that one stream."""
    import importlib

    from kvscope.runtime import step

    gen_mod = importlib.import_module("kvscope.runtime.generate")  # the module, not the function of that name

    order = []
    make = step.side_stream
    monkeypatch.setattr(gen_mod, "side_stream", lambda device: (order.append("stream"), make(device))[1])
    allocate = BudgetedCache.allocate

    def allocate_after(self, *a, **k):
        order.append("cache")
        return allocate(self, *a, **k)

    monkeypatch.setattr(BudgetedCache, "allocate", allocate_after)
    model = models[torch.float32]
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), device="cuda")
    generate(model, ids, BudgetedCache(model, "lru", budget_tokens=8), max_new_tokens=4, decode="graph")
    assert order[:2] == ["stream", "cache"]
    assert step.side_stream("cuda") is step.side_stream(torch.device("cuda", torch.cuda.current_device()))
