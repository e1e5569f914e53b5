"""int4 weights at prefill (kvscope.models.int4_prefill), on the CPU: reading a block layout from a packing function,
unpacking codes and scales, and which path a product takes. The packing kernel itself (tinygemm's, CUDA only) and
its products are checked on the GPU (tests/models/test_int4_prefill_gpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvscope.models import int4_prefill as ip
from kvscope.weightformats import INT4_DEQUANT_TOKENS, weight_format


def fake_pack(perm: torch.Tensor):
    """A packing function with the block layout `perm` (storage slot s holds position perm[s]), taking torchao's
    [rows, cols / 2] bytes (even column in the high nibble) and giving int32 words, as tinygemm's does."""

    def pack(u8: torch.Tensor) -> torch.Tensor:
        rows = u8.shape[0]
        codes = torch.stack((u8 >> 4, u8 & 15), -1).view(rows // 8, 8, -1, 128).transpose(1, 2)  # [nb, kb, 8, 128]
        slots = codes.reshape(*codes.shape[:2], 1024)[..., perm]
        packed = (slots[..., 0::2] | (slots[..., 1::2] << 4)).to(torch.uint8).contiguous()
        return packed.view(torch.int32).view(*codes.shape[:2], 32, 4)

    return pack


class FakeWeight:
    """What dequantize reads of torchao's int4 tensor: qdata, scale_and_zero and the unpadded shape."""

    def __init__(self, qdata, scale_and_zero, shape):
        self.qdata, self.scale_and_zero, self.shape = qdata, scale_and_zero, torch.Size(shape)


def test_the_block_layout_is_read_back_from_the_packing_function():
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    order = ip.slot_order("cpu", pack=fake_pack(perm))
    assert torch.equal(perm[order], torch.arange(1024))  # position p is held by slot order[p]


def test_a_packing_function_that_is_not_a_permutation_is_refused():
    perm = torch.arange(1024)
    perm[5] = perm[6]
    with pytest.raises(ValueError, match="not a permutation"):
        ip.slot_order("cpu", pack=fake_pack(perm))


def test_dequantize_gives_back_codes_scales_and_zeros(monkeypatch):
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(1024, generator=g)
    n, k, group = 16, 256, 128
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    qdata = fake_pack(perm)((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8))
    scale_zero = torch.randn(k // group, n, 2, generator=g).to(torch.bfloat16)
    monkeypatch.setitem(ip._ORDER, torch.device("cpu"), ip.slot_order("cpu", pack=fake_pack(perm)))
    got = ip.dequantize(FakeWeight(qdata, scale_zero, (12, 200)))  # the unpadded shape is cropped
    s = scale_zero[..., 0].t().repeat_interleave(group, 1)
    z = scale_zero[..., 1].t().repeat_interleave(group, 1)
    want = ((codes - 8).float() * s.float() + z.float())[:12, :200]
    assert got.shape == (12, 200) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)  # two bf16 roundings


@pytest.fixture
def layer(monkeypatch):
    """An Int4Linear over a dense weight, its unpacking faked as twice the weight (a product says its path)."""
    monkeypatch.setattr(ip, "_CHECKED", set())
    monkeypatch.setitem(ip._STATE, "off", None)
    model = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False, dtype=torch.bfloat16))
    monkeypatch.setattr(ip, "dequantize", lambda w: 2 * w)
    monkeypatch.setattr(ip, "_on_nvidia", lambda weight: True)
    model[0].weight.qdata = torch.zeros(1)  # what usable() keys a checked shape on
    ip.replace_linears(model, ["0"])
    return model[0]


def test_many_rows_run_on_the_unpacked_weight_and_few_on_the_packed_one(layer, monkeypatch):
    monkeypatch.setattr(ip, "check", lambda w: 0.0)
    few, many = torch.randn(2, 3, 32, dtype=torch.bfloat16), torch.randn(1, INT4_DEQUANT_TOKENS, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(few), few @ layer.weight.t())
        got = layer(many)  # an fp32 input goes in as bf16 and comes out fp32, as torchao's own product does
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, (2 * many.bfloat16() @ layer.weight.t()).float())
    assert type(layer) is ip.Int4Linear and layer.in_features == 32 and layer.out_features == 8


@pytest.mark.parametrize("check", [lambda w: 0.5, lambda w: float("nan"), lambda w: 1 / 0])
def test_a_failed_check_turns_the_path_off_once_with_a_warning(layer, monkeypatch, check):
    monkeypatch.setattr(ip, "check", check)
    many = torch.randn(INT4_DEQUANT_TOKENS, 32, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(layer(many), many @ layer.weight.t())  # the packed product, every time
    assert sum("int4 prefill on dequantized weights is off" in str(w.message) for w in caught) == 1
    assert ip._STATE["off"]


def test_the_planner_prices_the_unpacked_weight_from_the_threshold():
    fmt = weight_format("int4")
    below = INT4_DEQUANT_TOKENS - 1
    assert fmt.product_temporary_bytes(14336, 4096, "bf16", below) == below * 4096 * 2
    assert fmt.product_temporary_bytes(14336, 4096, "bf16", INT4_DEQUANT_TOKENS) == 3 * 14336 * 4096
    assert fmt.product_temporary_bytes(4100, 1000, "bf16", 8192) == 3 * 4104 * 1024  # padded to the tile


def test_an_oom_in_the_check_is_an_oom_and_leaves_the_path_on(layer, monkeypatch):
    def oom(weight):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 176.00 MiB")

    monkeypatch.setattr(ip, "check", oom)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        layer(torch.randn(INT4_DEQUANT_TOKENS, 32, dtype=torch.bfloat16))
    assert ip._STATE["off"] is None


def test_off_an_nvidia_gpu_the_packed_product_runs(monkeypatch):
    monkeypatch.setitem(ip._STATE, "off", None)
    weight = torch.nn.Parameter(torch.zeros(8, 32))  # a CPU weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ip.usable(weight)
    assert "NVIDIA GPUs only, not cpu" in str(caught[0].message)
