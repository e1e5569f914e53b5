"""advise's accounting against the engines' own published start-up figures (docs/engines.md lists the sources).

Each test states the figure, where it was published and the engine version; tolerances are what the model achieves,
and a change to the accounting that moves a prediction further from the engine fails here.
"""

from __future__ import annotations

import pytest

from kvscope.engines import sglang_memory as sm
from kvscope.engines import vllm_memory as vm
from kvscope.engines.devices import GIB, device
from kvscope.models.spec import ModelSpec

LLAMA_31_8B = ModelSpec.from_catalogue("llama-3.1-8b")


def test_vllm_0_19_h100_llama_31_8b():
    """llm-d-incubation/llm-d-planner docs/accuracy/vllm-v0.19.0-accuracy-report.md: H100-80GB, tp 1,
    max_model_len 8192, --gpu-memory-utilization 0.95: weights 14.99 GiB, torch peak increase 1.89 GiB, non-torch
    0.25 GiB, "Available KV cache memory: 58.11 GiB", "GPU KV cache size: 476,016 tokens", 58.11x."""
    p = vm.predict(LLAMA_31_8B, vm.VllmConfig(gpu_memory_utilization=0.95, max_model_len=8192, version=(0, 19, 0)),
                   device("H100-80GB"))
    assert p.weights_bytes / GIB == pytest.approx(14.99, abs=0.005)
    assert p.activation_bytes / GIB == pytest.approx(1.89, rel=0.01)
    assert p.available_kv_bytes / GIB == pytest.approx(58.11, rel=0.001)
    assert p.kv_tokens == pytest.approx(476_016, rel=0.001)
    assert p.max_concurrency == pytest.approx(58.11, rel=0.001)
    assert not p.cuda_graph_reserved  # 0.19 sized the pool before the graphs


def test_vllm_0_15_a100_40gb_eager_llama_31_8b():
    """github.com/ilseokoh/vllm-gce README.md: vLLM 0.15.1, A100-40GB, LLM(enforce_eager=True,
    gpu_memory_utilization=0.9), max_model_len 131072: "Available KV cache memory: 19.28 GiB",
    "GPU KV cache size: 157,936 tokens", "Maximum concurrency for 131,072 tokens per request: 1.20x"."""
    cfg = vm.VllmConfig(gpu_memory_utilization=0.9, enforce_eager=True, offline=True, version=(0, 15, 1))
    p = vm.predict(LLAMA_31_8B, cfg, device("A100-40GB"))
    assert p.max_num_batched_tokens == 8192  # "Chunked prefill is enabled with max_num_batched_tokens=8192."
    assert p.available_kv_bytes / GIB == pytest.approx(19.28, rel=0.002)
    assert p.kv_tokens == pytest.approx(157_936, rel=0.002)
    assert p.max_concurrency == pytest.approx(1.20, abs=0.01)


@pytest.mark.parametrize("tp, gib", [(1, 14.99), (2, 7.51), (4, 3.77)])
def test_vllm_weights_per_gpu_under_tensor_parallel(tp, gib):
    """The same report's TP sensitivity table: "Model loading took" 14.99 / 7.51 / 3.77 GiB at tp 1 / 2 / 4."""
    assert vm.weights_bytes(LLAMA_31_8B, vm.VllmConfig(tensor_parallel_size=tp)) / GIB == pytest.approx(gib, abs=0.005)


def test_vllm_sampler_term_predicts_qwen3_14b():
    """Out of sample: the same report measured a 2.23 GiB activation reserve for Qwen/Qwen3-14B (vLLM 0.17-0.18,
    H100, 1024 sequences); the sampler term, fitted to Llama-3.1-8B alone, predicts it from the vocabulary size."""
    qwen3_14b = ModelSpec.from_hf_config({
        "model_type": "llama", "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960})
    forward, sampler = vm.activation_bytes(qwen3_14b, vm.VllmConfig(), 8192, 1024)
    assert max(forward, sampler) / GIB == pytest.approx(2.23, rel=0.01)


def test_sglang_docs_h100_llama_31_8b():
    """SGLang's documentation, "Quick Start: Sending Requests" (docs.sglang.ai, 2025-01-23, the 0.4.1 series),
    Meta-Llama-3.1-8B-Instruct with default flags (mem_fraction_static=0.88): "Load weight begin. avail
    mem=78.81 GB", "Load weight end ... avail mem=63.72 GB", "max_total_num_tokens=444500"."""
    p = sm.predict(LLAMA_31_8B, sm.SglangConfig(version=(0, 4, 1)), device("H100-80GB"))
    assert p.mem_fraction_static == 0.88
    assert p.pre_load_free_bytes / GIB == pytest.approx(78.81, rel=0.003)
    assert p.after_weights_bytes / GIB == pytest.approx(63.72, rel=0.003)
    assert p.max_total_num_tokens == pytest.approx(444_500, rel=0.002)


def test_sglang_0_4_4_pr_4760_llama_31_8b():
    """sgl-project/sglang pull request #4760 (2025-03-25, 0.4.4 series): "mem usage=15.11 GB",
    "KV Cache is allocated. #tokens: 442750"."""
    p = sm.predict(LLAMA_31_8B, sm.SglangConfig(version=(0, 4, 4)), device("H100-80GB"))
    assert p.weights_bytes / GIB == pytest.approx(15.11, rel=0.01)
    assert p.max_total_num_tokens == pytest.approx(442_750, rel=0.003)


def test_sglang_0_5_23_default_fraction_from_its_heuristic():
    """0.5.23's handle_gpu_memory_settings on an H100 (nvidia-smi 81559 MiB), tp 1: chunk 8192, decode graphs up to
    256, 58 prefill graph sizes: reserved = max(512 + 8192 * 1.5 + 128 + 512 + 464, 10240) MiB = 13904 MiB."""
    p = sm.predict(LLAMA_31_8B, sm.SglangConfig(), device("H100-80GB"))
    assert (p.chunked_prefill_size, p.cuda_graph_max_bs, p.reserved_mib) == (8192, 256, 13904)
    assert p.mem_fraction_static == round((81559 - 13904) / 81559, 3)
    assert p.max_running_requests == 2048
