"""The fused decode attention (kvscope.cache.attention_triton) against the unfused path, for every store format.

Runs on CUDA (opt in with --gpu), or on CPU through Triton's interpreter when TRITON_INTERPRET=1 is set and Triton is
installed (slow, for developing the kernel without a GPU)."""

import os

import pytest
import torch

from kvscope.cache.attention import attention_weights, grouped_attention
from kvscope.cache.store import make_store

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + (["cpu"] if INTERPRET else [])
FORMATS = [None, "fp8", "int8", "int4"]


def reference(store, query, valid, own, upto, scaling):
    k, v = store.read(upto, query.dtype)
    mask = valid[:, :, :upto].scatter(-1, own[..., None], True)[:, :, None, :]
    return grouped_attention(query, k, v, mask, scaling)


def filled(kv_dtype, device, dtype, b=2, h=2, slots=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = make_store(kv_dtype, b, h, slots, d, dtype, device)
    keys = torch.randn(b, h, slots, d, generator=g).to(device, dtype)
    values = torch.randn(b, h, slots, d, generator=g).to(device, dtype)
    for start in range(0, slots, 100):  # in pieces, so int4 flushes its ring and keeps the last tokens pending
        store.write_range(start, keys[:, :, start:start + 100], values[:, :, start:start + 100])
    return store


TUNINGS = {"default": {},
           "loop": {"SPLIT": 128, "BLOCK_N": 64},  # several tiles per program
           # the merge loops over blocks of splits
           "many-splits": {"SPLIT": 32, "BLOCK_N": 16, "NUM_WARPS": 2, "COMBINE_BLOCK": 2}}


def kernel_inputs(device, kv_dtype, upto, tuning, monkeypatch, seed):
    """The kernel tests' setup: a tuning applied, a filled store, a strided query, a random valid mask and own slots
    (the last slot, one a few slots back, the first). Returns (store, query, valid, own, compute dtype)."""
    from kvscope.cache import attention_triton

    for kind, default in attention_triton.TUNING.items():
        monkeypatch.setitem(attention_triton.TUNING, kind, default | TUNINGS[tuning])
    if "COMBINE_BLOCK" in TUNINGS[tuning]:
        monkeypatch.setattr(attention_triton, "COMBINE_BLOCK", TUNINGS[tuning]["COMBINE_BLOCK"])
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    store = filled(kv_dtype, device, dtype)
    g = torch.Generator().manual_seed(seed)
    b, h, hq, d = 2, 2, 6, 64
    query = torch.randn(b, 1, hq, d, generator=g).to(device, dtype).transpose(1, 2)  # strided, as from the model
    valid = (torch.rand(b, h, 300, generator=g) < 0.6).to(device)
    own = torch.tensor([[upto - 1, max(0, upto - 5)], [0, upto - 1]], device=device)
    return store, query, valid, own, dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("upto", [1, 37, 300])
@pytest.mark.parametrize("tuning", list(TUNINGS))
def test_matches_unfused(device, kv_dtype, upto, tuning, monkeypatch):
    from kvscope.cache.attention_triton import decode_attention

    store, query, valid, own, dtype = kernel_inputs(device, kv_dtype, upto, tuning, monkeypatch, seed=1)
    got = decode_attention(store, query, valid, own, upto, 0.125)
    want = reference(store, query, valid, own, upto, 0.125)
    # bf16: rounding of the products; fp32: the eager int8 dequantization computes in fp16 (its parameters' dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4 if kv_dtype is None else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("upto", [1, 37, 300])
@pytest.mark.parametrize("tuning", list(TUNINGS))
def test_weights_match_unfused(device, kv_dtype, upto, tuning, monkeypatch):
    """With weights=True the kernel also returns the softmax weights a policy observes, as attention_weights gives
    them (mean over each KV head's query heads); the output is unchanged."""
    from kvscope.cache.attention_triton import decode_attention

    store, query, valid, own, dtype = kernel_inputs(device, kv_dtype, upto, tuning, monkeypatch, seed=2)
    b, h = valid.shape[:2]
    out, weights = decode_attention(store, query, valid, own, upto, 0.125, True)
    torch.testing.assert_close(out, decode_attention(store, query, valid, own, upto, 0.125), atol=0, rtol=0)
    k, _ = store.read(upto, query.dtype)
    mask = valid[:, :, :upto].scatter(-1, own[..., None], True)[:, :, None, :]
    want = attention_weights(query, k, mask, 0.125)
    assert weights.shape == want.shape == (b, h, 1, upto) and weights.dtype == torch.float32
    assert torch.all(weights[~mask] == 0)
    # both paths multiply the same bf16 (or fp32) values in fp32; only the order of the sums differs. Weights are
    # about 1/180 here, so the absolute tolerance must be far below that to check anything. The eager int8 read
    # dequantizes in fp16 (its parameters' dtype) on CPU, hence the looser fp32 tolerance for quantized stores.
    atol, rtol = (1e-5, 1e-3) if dtype == torch.bfloat16 or kv_dtype is None else (1e-4, 2e-3)
    torch.testing.assert_close(weights, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(weights.sum(-1), torch.ones(b, h, 1, device=device), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FORMATS)
@pytest.mark.parametrize("policy,budget", [("full", 64), ("streaming_llm", 24), ("knorm", 20), ("tova", 20),
                                           ("h2o", 24), ("lru", 24), ("snapkv", 36)])
def test_generation_fused_equals_unfused(device, kv_dtype, policy, budget, monkeypatch):
    """Whole generations with eviction and left padding: the fused decode path gives the unfused path's tokens."""
    from kvscope.cache import BudgetedCache, fused, quant
    from kvscope.runtime import generate
    from tests.conftest import TINY, build_tiny

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    monkeypatch.setattr(fused, "_STATE", {"broken": False, "ran": set()})
    if device == "cpu":  # the interpreter runs the attention kernel on CPU tensors; the stores stay eager there
        monkeypatch.setattr(fused, "available", lambda t: True)
        monkeypatch.setattr(quant, "_fast", lambda *a: (False, None))
    model = build_tiny(TINY | {"head_dim": 64}).to(device)  # int4 packs head_dim in groups of 64
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (2, 30), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    runs, kept = {}, {}
    for use in (True, False):
        monkeypatch.setattr(fused, "DECODE_ATTENTION", use)
        cache = BudgetedCache(model, policy, budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=16)
        runs[use] = generate(model, ids, cache, attention_mask=mask, max_new_tokens=12, chunk_size=16)
        # the positions each row kept: the same evictions, so the same observed scores
        kept[use] = [layer.state.position.masked_fill(~layer.state.valid, -1).sort(-1).values
                     for layer in cache.layers]
    assert fused.ran("attention_triton.decode_attention") and not fused._STATE["broken"]
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    assert all(torch.equal(a, b) for a, b in zip(kept[True], kept[False]))


@pytest.mark.parametrize("device", DEVICES)
def test_int4_with_two_channel_groups(device):
    """head_dim 128: two value-parameter groups per token (the int4 tile reshapes codes per group)."""
    from kvscope.cache.attention_triton import decode_attention

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    store = filled("int4", device, dtype, slots=333, d=128)
    g = torch.Generator().manual_seed(2)
    query = torch.randn(2, 1, 4, 128, generator=g).to(device, dtype).transpose(1, 2)
    valid = (torch.rand(2, 2, 333, generator=g) < 0.7).to(device)
    own = torch.tensor([[332, 10], [5, 332]], device=device)
    got = decode_attention(store, query, valid, own, 333, 0.09)
    want = reference(store, query, valid, own, 333, 0.09)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
