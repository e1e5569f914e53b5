import pytest
import torch

from kvscope.errors import UsageError
from kvscope.models import catalogue
from kvscope.models.spec import ModelSpec

# Published parameter counts and KV bytes/token (bf16) worked out by hand from each config.json:
# KV = 2 (K and V) * layers * kv_heads * head_dim * 2 bytes.
GOLDEN = {
    "llama-3-8b": (8_030_261_248, 2 * 32 * 8 * 128 * 2),
    "llama-3.1-8b": (8_030_261_248, 2 * 32 * 8 * 128 * 2),
    "llama-3-70b": (70_553_706_496, 2 * 80 * 8 * 128 * 2),
    "llama-3.1-70b": (70_553_706_496, 2 * 80 * 8 * 128 * 2),
    "llama-3.3-70b": (70_553_706_496, 2 * 80 * 8 * 128 * 2),
    "llama-3.1-405b": (405_853_388_800, 2 * 126 * 8 * 128 * 2),
    "llama-3.2-1b": (1_235_814_400, 2 * 16 * 8 * 64 * 2),
    "llama-3.2-3b": (3_212_749_824, 2 * 28 * 8 * 128 * 2),
    "smollm2-135m": (134_515_008, 2 * 30 * 3 * 64 * 2),
}


def test_llama3_8b_golden_bytes():
    spec = ModelSpec.from_catalogue("llama-3-8b")
    assert spec.kv_bytes_per_token("bf16") == 131072
    assert spec.weights_bytes("bf16") == 16_060_522_496


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_params_and_kv(name):
    params, kv = GOLDEN[name]
    spec = ModelSpec.from_catalogue(name)
    assert spec.num_params() == params
    assert spec.weights_bytes("bf16") == 2 * params
    assert spec.weights_bytes("fp32") == 4 * params
    assert spec.kv_bytes_per_token("bf16") == kv
    assert spec.kv_bytes_per_token("fp32") == 2 * kv


@pytest.mark.parametrize("name", catalogue.names())
def test_param_count_matches_transformers(name):
    """Build each catalogue shape on the meta device and count what transformers really creates."""
    from kvscope import _compat

    config = _compat.llama_config(catalogue.catalogue_entry(name).config)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    assert counted == ModelSpec.from_catalogue(name).num_params()


def test_quantized_kv_formats_exact_bytes():
    spec = ModelSpec.from_catalogue("llama-3-8b")  # head_dim 128, 32 layers, 8 KV heads
    per = 32 * 8
    assert spec.kv_bytes_per_token("fp8") == per * 2 * (128 + 2)
    assert spec.kv_bytes_per_token("int8") == per * 2 * (128 + 4)
    assert spec.kv_bytes_per_token("int4") == per * ((64 + 8) + (64 + 8))
    assert spec.kv_bytes_per_token("int4") <= 0.3 * spec.kv_bytes_per_token("bf16")
    assert spec.kv_fixed_bytes("int4", "bf16") == 128 * per * 2 * 128 * 2
    assert spec.kv_fixed_bytes("int8", "bf16") == 0


def test_tensor_parallel_splits_weights_and_kv():
    spec = ModelSpec.from_catalogue("llama-3-70b")
    assert spec.kv_bytes_per_token("bf16", tp=8) == spec.kv_bytes_per_token("bf16") // 8
    assert spec.kv_bytes_per_token("bf16", tp=16) == spec.kv_bytes_per_token("bf16", tp=8)  # KV heads replicated
    # transformers' Llama plan: the seven projections and the untied lm_head split 4 ways; the RMSNorm weights and
    # the embedding (128256 x 8192) stay whole on every rank
    norms = (2 * 80 + 1) * 8192
    embedding = 128256 * 8192
    split = 70_553_706_496 - norms - 2 * embedding
    replicated = spec.weights_bytes("bf16", tp=4, embedding_split=False)
    assert replicated == 2 * (split // 4 + norms + embedding + embedding // 4) == 36_854_841_344
    # transformers 5.24 also splits the embedding on the vocabulary
    assert spec.weights_bytes("bf16", tp=4, embedding_split=True) == 2 * (split // 4 + norms + 2 * (embedding // 4))


def test_tensor_parallel_tied_head_is_the_replicated_embedding():
    spec = ModelSpec.from_hf_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "vocab_size": 256, "tie_word_embeddings": True})
    layer_projections = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 160
    assert spec.weights_params_per_rank(2) == 2 * layer_projections // 2 + (2 * 2 + 1) * 64 + 256 * 64
    assert spec.weights_params_per_rank(2, embedding_split=True) == layer_projections + 5 * 64 + 128 * 64


def test_rope_scaling_read_from_either_key_style():
    spec = ModelSpec.from_catalogue("llama-3.1-8b")
    assert spec.rope_scaling["factor"] == 8.0 and spec.rope_scaling["rope_type"] == "llama3"
    assert ModelSpec.from_catalogue("llama-3.2-1b").rope_scaling["factor"] == 32.0
    new_style = {**catalogue.from_name("llama-3.1-8b")}
    new_style.pop("rope_scaling")
    new_style["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}
    assert ModelSpec.from_hf_config(new_style).rope_scaling["factor"] == 8.0
    assert ModelSpec.from_catalogue("llama-3-8b").rope_scaling is None


def test_from_transformers_config_object():
    from kvscope import _compat

    config = _compat.llama_config(catalogue.from_name("llama-3.2-3b"))
    spec = ModelSpec.from_hf_config(config)
    assert spec.num_params() == GOLDEN["llama-3.2-3b"][0]
    assert spec.tie_word_embeddings


@pytest.mark.parametrize("values, fragment", [
    ({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8}, "BertModel"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "T5ForConditionalGeneration"),
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "MambaForCausalLM"),
    ({"model_type": "llama", "hidden_size": 64}, "lacks"),
    ({**catalogue.from_name("llama-3-8b"), "num_key_value_heads": 5}, "not a multiple"),
])
def test_unsupported_configs_name_the_architecture(values, fragment):
    with pytest.raises(UsageError, match=fragment):
        ModelSpec.from_hf_config(values)
