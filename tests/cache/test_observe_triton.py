"""lru's fused decode-step update (kvscope.cache.observe_triton) against the PyTorch ops it replaces.

Runs on CUDA (opt in with --gpu), or on CPU through Triton's interpreter when TRITON_INTERPRET=1 is set and Triton is
installed."""

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + (["cpu"] if INTERPRET else [])


def reference(score, w, valid, position, threshold, k):
    """lru's update written with topk, over weights padded with zeros to every slot."""
    wide = F.pad(w, (0, score.shape[-1] - w.shape[-1]))
    kth = wide.topk(min(k, wide.shape[-1]), dim=-1).values[..., -1]
    used = ((wide > threshold) | ((wide >= kth[..., None]) & (wide > 0))) & valid
    return torch.maximum(score, torch.where(used, position.float()[:, None, None], -1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slots", [5, 300, 2560, 9000])  # 9000: past ROW_MAX, the two-launch path
@pytest.mark.parametrize("narrower", [0, 1])
@pytest.mark.parametrize("top_k", [1, 8, 16])
@pytest.mark.parametrize("weights", ["plain", "ties", "peaks"])
def test_matches_topk(device, slots, narrower, top_k, weights):
    from kvscope.cache.observe_triton import lru_decode

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    g = torch.Generator().manual_seed(slots + top_k)
    width = slots - narrower * (slots // 3)  # weights of the slots written so far: narrower than the row
    w = torch.rand(2, 3, width, generator=g)
    if weights == "ties":  # a handful of distinct values, zeros among them: the k-th largest is tied
        w = (w * 4).floor()
    if weights == "peaks":  # a dozen weights above the threshold: at k <= 12 the top k adds nothing to them
        w[..., ::max(1, width // 12)] += width / 8
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
    valid = torch.rand(2, 3, slots, generator=g) > 0.2
    score = torch.rand(2, 3, slots, generator=g) * 10
    position = torch.tensor([7, 20])
    want = reference(score, w, valid, position, 0.01, top_k)
    got = score.to(device)
    lru_decode(got, w.to(device), valid.to(device), position.to(device), 0.01, top_k)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_lru_observes_through_the_fused_update(device, monkeypatch):
    """A decode-step observation by the policy itself: the fused kernels ran, and the scores are the PyTorch path's."""
    from kvscope.cache import fused
    from kvscope.policies import get
    from kvscope.policies.base import Observation, SlotState

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    monkeypatch.setattr(fused, "_STATE", {"broken": False, "ran": set()})
    if device == "cpu":
        monkeypatch.setattr(fused, "available", lambda t: True)
    g = torch.Generator().manual_seed(1)
    b, h, s = 2, 2, 64
    states = []
    for use in (True, False):
        monkeypatch.setattr(fused, "USE_TRITON", use)
        if not use:
            monkeypatch.setattr(fused, "available", lambda t: False)
        st = SlotState.empty(b, h, s, device)
        st.valid[:, :, :40] = True
        st.position[:, :, :40] = torch.arange(40, device=device)
        w = torch.softmax(torch.randn(b, h, 1, s, generator=g.manual_seed(1)).to(device), -1)
        get("lru").observe(st, Observation(w, torch.tensor([[40], [41]], device=device)))
        states.append(st.score.cpu())
    assert fused.ran("observe_triton.lru_decode")
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["column", "expanded"])
def test_positions_need_not_be_contiguous(device, layout):
    """The query positions come as a column of [B, n] positions (a prefill ending in a one-token piece) or as one
    position expanded over the batch (a forward without position_ids): each row still gets its own."""
    from kvscope.cache.observe_triton import lru_decode

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    g = torch.Generator().manual_seed(5)
    w = torch.softmax(torch.randn(3, 2, 40, generator=g), -1)
    valid = torch.ones(3, 2, 40, dtype=torch.bool)
    score = torch.zeros(3, 2, 40)
    columns = torch.tensor([[1, 30], [2, 31], [3, 32]])
    position = columns[:, 1] if layout == "column" else torch.tensor(33).expand(3)  # stride 2, or 0
    assert not position.is_contiguous()
    want = reference(score, w, valid, position, 0.01, 8)
    got = score.to(device)
    lru_decode(got, w.to(device), valid.to(device), position.to(device), 0.01, 8)
    assert torch.equal(got.cpu(), want)
