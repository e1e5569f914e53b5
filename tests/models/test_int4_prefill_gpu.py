"""int4 weights at prefill on the GPU: the block layout read from tinygemm's packing kernel, the unpacked weight
against the packed kernel's own products, and a quantized model's prefill through both paths."""

from __future__ import annotations

import pytest
import torch

from kvscope.models import int4_prefill as ip
from kvscope.models import quantize as q
from kvscope.weightformats import INT4_DEQUANT_TOKENS
from tests.conftest import TINY, build_tiny

pytestmark = pytest.mark.gpu
pytest.importorskip("torchao")


def int4_weight(n: int, k: int, seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
    model = torch.nn.Sequential(layer)
    import torchao

    torchao.quantization.quantize_(model, q.config(q.weight_format("int4"), torchao))
    return model[0].weight


@pytest.mark.parametrize("n,k", [(8, 1024), (1024, 4096), (4104, 1024), (4096, 3072)])
def test_the_unpacked_weight_is_what_the_packed_kernel_multiplies_by(n, k):
    w = int4_weight(n, k)
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    packed_view = torch.nn.functional.linear(eye, w).t()  # row j of the identity picks column j of the weight
    torch.testing.assert_close(ip.dequantize(w), packed_view, rtol=1e-2, atol=1e-3)
    assert ip.check(w) < ip.CHECK_TOLERANCE


def test_a_model_prefills_through_the_unpacked_weights_as_through_the_packed_ones(monkeypatch):
    config = {**TINY, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    model = build_tiny(config, dtype=torch.bfloat16).cuda()
    q.quantize(model, "int4", "cuda")
    assert isinstance(model.model.layers[0].mlp.down_proj, ip.Int4Linear)
    ids = torch.randint(0, config["vocab_size"], (2, INT4_DEQUANT_TOKENS), device="cuda")
    with torch.no_grad():
        unpacked = model(ids).logits.float()
        monkeypatch.setitem(ip._STATE, "off", "test")
        packed = model(ids).logits.float()
    assert ip._CHECKED  # the unpacked path ran (and its check passed) before it was turned off
    assert ((unpacked - packed).norm() / packed.norm()).item() < 2e-2
