"""Weight formats at load time (torchao): the planner's bytes against the tensors torchao really allocates, and every
kind of bad input (unknown format, torchao missing or too old, a format this device cannot run, a non-Linear layer)."""

from __future__ import annotations

import sys

import pytest
import torch

from kvscope.errors import UsageError
from kvscope.models import quantize as q
from kvscope.models.spec import ModelSpec
from kvscope.weightformats import WEIGHT_FORMATS, weight_format
from tests.conftest import TINY, build_tiny

pytest.importorskip("torchao")
CPU_FORMATS = [name for name, f in WEIGHT_FORMATS.items() if not f.cuda_only]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parameter_bytes(model) -> int:
    """Every parameter once, through torchao's subclasses to their inner tensors (qdata, scale, zero point)."""
    return sum(q.tensor_bytes(p) for p in model.parameters())


def inner_tensors(t) -> list[str]:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return t.__tensor_flatten__()[0] if is_traceable_wrapper_subclass(t) else []


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_planner_bytes_are_what_torchao_allocates(fmt, dtype):
    config = {**TINY, "intermediate_size": 96, "num_key_value_heads": 1}  # odd shapes: one KV head, 96-wide MLP
    model = build_tiny(config, dtype=DTYPES[dtype])
    q.quantize(model, fmt, "cpu")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert inner_tensors(weight), "torchao gives a tensor subclass with inner tensors"
    assert q.weights_format_of(model) == fmt
    spec = ModelSpec.from_hf_config(config, name="tiny")
    assert parameter_bytes(model) == spec.weights_bytes(dtype, weights=fmt)
    assert spec.weights_bytes(dtype, weights=fmt) < spec.weights_bytes(dtype)
    # embeddings, norms and the head stay dense, in the model dtype
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.dtype == DTYPES[dtype]
    assert type(model.model.embed_tokens.weight) is torch.nn.Parameter


@pytest.mark.parametrize("fmt", CPU_FORMATS)
def test_quantized_model_generates_close_to_dense(fmt):
    dense = build_tiny(dtype=torch.float32)
    quantized = build_tiny(dtype=torch.float32)
    q.quantize(quantized, fmt, "cpu")
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        a, b = dense(ids).logits, quantized(ids).logits
    assert not torch.equal(a, b)  # the weights really changed
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item())


def test_load_random_weights_with_a_format():
    import kvscope

    model, _, spec = kvscope.load("smollm2-135m", random_weights=True, device="cpu", dtype="bf16", weights="int8")
    assert q.weights_format_of(model) == "int8"
    assert parameter_bytes(model) == spec.weights_bytes("bf16", weights="int8")


def test_unknown_format():
    with pytest.raises(UsageError) as e:
        weight_format("int3")
    assert "int3" in str(e.value) and "weights" in str(e.value) and "--weights" in e.value.cli_message()
    with pytest.raises(UsageError):
        q.quantize(build_tiny(), "nf4", "cpu")


def test_torchao_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    with pytest.raises(UsageError) as e:
        q.quantize(build_tiny(), "int8", "cpu")
    assert "not installed" in str(e.value) and "pip install 'torchao>=0.18'" in e.value.cli_message()


def test_torchao_too_old(monkeypatch):
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.9.0")
    with pytest.raises(UsageError) as e:
        q.quantize(build_tiny(), "fp8", "cpu")
    assert "0.9.0" in str(e.value) and "0.18" in str(e.value)


def test_int4_on_the_cpu_names_the_device_it_needs():
    with pytest.raises(UsageError) as e:
        q.quantize(build_tiny(dtype=torch.bfloat16), "int4", "cpu")
    message = e.value.cli_message()
    assert "CUDA GPU of compute capability 8.0" in message and "--device cuda" in message and "cpu" in message


def test_a_layer_that_is_not_linear():
    class Projection(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = build_tiny()
    model.model.layers[1].mlp.up_proj = Projection(model.model.layers[1].mlp.up_proj)
    with pytest.raises(UsageError) as e:
        q.quantize(model, "int8", "cpu")
    assert "model.layers.1.mlp.up_proj" in str(e.value) and "Projection" in str(e.value)
    assert q.weights_format_of(model) is None  # nothing was quantized


def test_a_format_applies_once():
    model = build_tiny()
    q.quantize(model, "int8", "cpu")
    with pytest.raises(UsageError, match="already holds"):
        q.quantize(model, "fp8", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_planner_bytes_on_cuda(fmt):
    config = {**TINY, "hidden_size": 256, "intermediate_size": 384, "head_dim": 64}
    model = build_tiny(config, dtype=torch.bfloat16).cuda()
    q.quantize(model, fmt, "cuda")
    spec = ModelSpec.from_hf_config(config, name="tiny")
    assert parameter_bytes(model) == spec.weights_bytes("bf16", weights=fmt)
