"""The recall's fused first pass (kvscope.cache.recall_triton) against its PyTorch ops (kvscope.cache.recall).

Runs on CUDA (opt in with --gpu), or on CPU through Triton's interpreter when TRITON_INTERPRET=1 is set and Triton is
installed."""

import os

import pytest
import torch

from kvscope.cache.recall import _add_span

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + (["cpu"] if INTERPRET else [])


def spans(device, dtype, b=2, h=2, r=100, d=64, slots=(150, 70, 1, 90), seed=0):
    """Queries and spans of keys, values and validity; one row of the first span sees nothing, one span of row
    (1, 1) sees nothing, and one span's slots are a strided slice."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h, r, d, generator=g).to(device, dtype)
    parts = []
    for i, s in enumerate(slots):
        keys = torch.randn(b, h, 2 * s, d, generator=g).to(device, dtype)[:, :, ::2]  # strided along the slots
        values = torch.randn(b, h, s, d, generator=g).to(device, dtype)
        valid = torch.rand(b, h, 3 * s, generator=g).to(device)[..., :s] > 0.3
        if i == 0:
            valid[0, 0] = False
        if i == 1:
            valid[1, 1] = False
        parts.append((keys, values, valid))
    return query, parts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_span_adds_as_the_pytorch_ops(device, dtype):
    from kvscope.cache.recall_triton import add_span

    query, parts = spans(device, dtype)
    scaling = 0.125
    b, h, r, d = query.shape
    results = []
    for fused in (True, False):
        out = torch.zeros(b, h, r, d, device=device)
        lse = torch.full((b, h, r, 1), float("-inf"), device=device)
        for keys, values, valid in parts:
            if fused:
                lse = add_span(out, lse, query, keys, values, valid, scaling)
            else:
                q = query.to(keys.dtype).float() * scaling  # the kernel's products take the keys' dtype
                logits = (q @ keys.float().transpose(-1, -2)).masked_fill_(~valid[:, :, None, :], float("-inf"))
                lse = _add_span(out, lse, logits, values)
        results.append((out, lse))
    (out, lse), (want, want_lse) = results
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: the kernel rounds its probabilities before the values
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()


@pytest.mark.gpu
def test_on_cuda_the_recall_runs_the_fused_first_pass_and_matches_the_pytorch_ops(monkeypatch):
    """A recall on CUDA takes the fused span (with larger spans); with the fused kernels off it takes PyTorch ops: the
    last forward's outputs agree (fp32: to float rounding)."""
    from kvscope.cache import fused, recall
    from kvscope.cache.budgeted import BudgetedCache
    from kvscope.runtime import generate
    from tests.conftest import build_tiny

    torch.manual_seed(0)
    model = build_tiny().cuda()
    prompt = torch.randint(3, 200, (2, 136), device="cuda")
    outs = []
    original = recall.recall

    def spy(*args):
        result = original(*args)
        outs.append(result[1].clone())
        return result

    monkeypatch.setattr(recall, "recall", spy)
    for use in (True, False):
        monkeypatch.setattr(fused, "USE_TRITON", use)
        cache = BudgetedCache(model, "snapkv", budget_tokens=40, chunk_size=48, recall="cpu")
        generate(model, prompt, cache, max_new_tokens=1, chunk_size=48)
    assert fused.ran("recall_triton.add_span")
    half = len(outs) // 2
    assert half == model.config.num_hidden_layers
    for got, want in zip(outs[:half], outs[half:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_a_span_no_row_sees_leaves_a_very_small_running_softmax_as_it_was(device):
    """A running log-sum-exp far below exp's range (-100: exp(100) overflows fp32) and a span whose slots are all
    invalid: out and lse stay as they were, finite (0 * inf made nan)."""
    from kvscope.cache.recall_triton import add_span

    b, h, r, s, d = 1, 2, 70, 40, 64
    query = torch.randn(b, h, r, d, device=device)
    keys, values = torch.randn(b, h, s, d, device=device), torch.randn(b, h, s, d, device=device)
    out = torch.randn(b, h, r, d, device=device)
    lse = torch.full((b, h, r, 1), -100.0, device=device)
    before = out.clone()
    lse = add_span(out, lse, query, keys, values, torch.zeros(b, h, s, dtype=torch.bool, device=device), 0.125)
    assert torch.equal(out, before) and torch.equal(lse, torch.full_like(lse, -100.0))
