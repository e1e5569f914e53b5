"""The decode step's Triton kernels against the PyTorch formulas they replace (and the model's own modules).

Runs on CUDA (opt in with --gpu), or on CPU through Triton's interpreter when TRITON_INTERPRET=1 is set and Triton is
installed."""

from __future__ import annotations

import os

import pytest
import torch

from kvscope.cache import static
from kvscope.cache.budgeted import BudgetedCache
from kvscope.runtime import generate, kernels
from tests.conftest import build_tiny

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + (["cpu"] if INTERPRET else [])


def setup(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return torch.bfloat16 if device == "cuda" else torch.float32


def rand(*shape, device, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm(device, with_delta):
    from kvscope.runtime import kernels_triton

    dtype = setup(device)
    res = rand(3, 1, 576, device=device, dtype=dtype)
    delta = rand(3, 1, 576, device=device, dtype=dtype, seed=1) if with_delta else None
    weight = rand(576, device=device, dtype=dtype, seed=2)
    ref_res = res.clone()
    with torch.no_grad():
        ref = kernels.add_rmsnorm(ref_res, delta, weight, 1e-5) if device == "cpu" else None
    if device == "cuda":
        ref_res2 = res.clone()
        torch_ref = _torch_add_rmsnorm(ref_res2, delta, weight, 1e-5)
        ref, ref_res = torch_ref, ref_res2
    out = kernels_triton.add_rmsnorm(res, delta, weight, 1e-5)
    assert torch.equal(res, ref_res)  # the residual add rounds as the model's does
    torch.testing.assert_close(out, ref, atol=0, rtol=2 ** -7)  # at most one bf16 rounding step apart


def _torch_add_rmsnorm(res, delta, weight, eps):
    if delta is not None:
        res.add_(delta)
    x = res.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(res.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rotate_matches_the_model(device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvscope.runtime import kernels_triton

    dtype = setup(device)
    b, hq, hk, d = 2, 6, 2, 64
    q = rand(b, 1, hq * d, device=device, dtype=dtype).view(b, 1, hq, d).transpose(1, 2)
    k = rand(b, 1, hk * d, device=device, dtype=dtype, seed=1).view(b, 1, hk, d).transpose(1, 2)
    angles = rand(b, 1, d // 2, device=device, dtype=torch.float32, seed=2) * 30
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin)
    out_q, out_k = kernels_triton.rotate(q, k, cos, sin)
    if device == "cpu":
        assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    else:  # Triton's bf16 arithmetic on the GPU lands one rounding step away from PyTorch's in a few elements
        torch.testing.assert_close(out_q, ref_q, atol=1e-2, rtol=2 ** -7)
        torch.testing.assert_close(out_k, ref_k, atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(device):
    from kvscope.runtime import kernels_triton

    dtype = setup(device)
    g, u = rand(2, 1, 1536, device=device, dtype=dtype), rand(2, 1, 1536, device=device, dtype=dtype, seed=1)
    ref = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(kernels_triton.silu_mul(g, u), ref, atol=1e-6, rtol=2 ** -7)
    stacked = torch.cat([g, u], -1)  # the two halves of one [B, 1, 2I] product: strided rows
    torch.testing.assert_close(kernels_triton.silu_mul(stacked[..., :1536], stacked[..., 1536:]), ref, atol=1e-6,
                               rtol=2 ** -7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
@pytest.mark.parametrize("with_rope", [False, True])
@pytest.mark.parametrize("policy", ["lru", "streaming_llm"])  # the two scores the kernel writes: position, zero
@torch.inference_mode()
def test_insert_kernel_writes_what_the_torch_path_writes(device, kv_dtype, with_rope, policy):
    from kvscope.cache import static_triton
    from kvscope.runtime.kernels import rotate

    dtype = setup(device)
    model = build_tiny().to(device, dtype)
    caches = []
    for _ in range(2):
        cache = BudgetedCache(model, policy, budget_tokens=12, kv_dtype=kv_dtype, chunk_size=4)
        generate(model, torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0)).to(device), cache,
                 max_new_tokens=1, chunk_size=4, decode="forward")
        static.refill(cache.layers[0])
        cache.settings.queue_ptr.fill_(2)
        caches.append(cache)

    def heads(n, seed):
        return rand(2, 1, n * 16, device=device, dtype=dtype, seed=seed).view(2, 1, n, 16).transpose(1, 2)

    key, value, query = heads(2, 5), heads(2, 6), heads(4, 7)
    angles = rand(2, 1, 8, device=device, dtype=torch.float32, seed=8) * 20
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    position = torch.tensor([40, 33], device=device)
    a, b = caches[0].layers[0], caches[1].layers[0]
    qa, ka = query.clone(), key.clone()
    slot_a = static_triton.insert(a, ka, value, position, caches[0].settings.queue_ptr,
                                  (qa, cos, sin) if with_rope else None)
    qb, kb = (rotate(query.clone(), key.clone(), cos, sin)) if with_rope else (query.clone(), key.clone())
    slot_b = b.queue.gather(-1, caches[1].settings.queue_ptr.view(1, 1, 1).expand(2, 2, 1))
    b.store.write(slot_b, kb, value)
    b.state.position.scatter_(-1, slot_b, position[:, None, None].expand(2, 2, 1))
    b.state.valid.scatter_(-1, slot_b, True)
    torch.maximum(b.state.newest, position[:, None, None].expand(2, 2, 1), out=b.state.newest)
    b.settings.policy.on_insert(b.state, slot_b, kb)
    assert torch.equal(slot_a, slot_b)
    close = torch.equal if device == "cpu" else lambda x, y: torch.allclose(x.float(), y.float(), atol=1e-2, rtol=1e-2)
    assert close(qa, qb) and close(ka, kb)
    if device == "cpu" or not with_rope:  # bit for bit; with RoPE on the GPU, as close as the rotation above
        for name, t in a.store.tensors().items():
            assert torch.equal(t.view(torch.uint8), b.store.tensors()[name].view(torch.uint8)), name
    for name in ("valid", "position", "newest", "score"):
        assert torch.equal(getattr(a.state, name), getattr(b.state, name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_skips_empty_tiles_exactly(device):
    from kvscope.cache import attention_triton
    from kvscope.cache.attention import attention_weights, grouped_attention
    from kvscope.cache.store import make_store

    dtype = setup(device)
    b, h, hq, d, slots = 1, 2, 4, 64, 400
    store = make_store(None, b, h, slots, d, dtype, device)
    store.write_range(0, rand(b, h, slots, d, device=device, dtype=dtype), rand(b, h, slots, d, device=device,
                                                                              dtype=dtype, seed=1))
    valid = torch.zeros(b, h, slots, dtype=torch.bool, device=device)
    valid[:, :, :70] = True  # tiles past slot 128 hold nothing visible
    valid[:, 1, 300] = True
    own = torch.tensor([[69, 300]], device=device)
    query = rand(b, hq, 1, d, device=device, dtype=dtype, seed=2)
    out, weights = attention_triton.decode_attention(store, query, valid, own, slots, 0.125, True)
    k, v = store.read(slots, dtype)
    mask = valid.scatter(-1, own[..., None], True)[:, :, None, :]
    torch.testing.assert_close(out, grouped_attention(query, k, v, mask, 0.125), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(weights, attention_weights(query, k, mask, 0.125), atol=1e-3, rtol=1e-2)
    assert not weights[..., 130:300].any()
