"""vLLM V1's KV-cache sizing, step by step as its worker does it (read from vLLM 0.33.0:
vllm/v1/worker/gpu_worker.py `determine_available_memory`, vllm/v1/worker/utils.py `request_memory`,
vllm/utils/mem_utils.py `memory_profiling`, vllm/v1/core/kv_cache_planning.py, vllm/engine/arg_utils.py
`get_batch_defaults`):

1. After NCCL and cuBLAS are up, a snapshot of free memory; the budget is ceil(total * --gpu-memory-utilization).
2. Weights load ("Model loading took X GiB": parameters plus the RoPE cos/sin cache, in the model dtype).
3. `profile_run`: a dummy forward of --max-num-batched-tokens tokens, then a dummy sampler run over
   min(--max-num-seqs, tokens) rows of full-vocabulary logits. Its peak above what stays allocated is the
   activation reserve; memory outside torch that appeared since the snapshot (NCCL, attention workspaces) is
   counted too.
4. From 0.21.0 on (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1, the default) the CUDA-graph memory estimate is also
   taken off; before, graphs were captured after the KV cache was sized, inside the (1 - utilization) margin.
5. Available KV memory = budget - weights - activation peak - non-torch - CUDA graphs (or --kv-cache-memory-bytes,
   which skips the accounting); blocks = available // (layers * block_size * 2 * KV heads * head_dim * dtype bytes).
6. "GPU KV cache size: N tokens" = blocks / ceil(max_model_len / block_size) * max_model_len, and that ratio is the
   "Maximum concurrency for max_model_len tokens per request".

The activation and non-torch terms cannot be read from source: they are measured by the engine at start-up. They are
modelled with coefficients fitted to published start-up logs (docs/engines.md lists them and how close each lands).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from kvscope.engines.devices import GIB, Device
from kvscope.kvformats import DTYPE_BYTES
from kvscope.models.spec import ModelSpec

VERSION = (0, 33, 0)
BLOCK_SIZE = 16  # tokens per KV block for full-attention models
CUDA_GRAPH_RESERVE_SINCE = (0, 21, 0)  # "CUDA graph memory profiling is enabled (default since v0.21.0)"
KV_ELEMENT_BYTES = {"auto": None, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}

# Fitted coefficients (docs/engines.md, "How close advise comes"):
# - forward peak per batched token, in elements of the model dtype: three intermediate-sized tensors (gate_up, its
#   activation) and six hidden-sized ones; fitted to vLLM 0.15.1, Llama-3.1-8B, A100-40GB, eager, 8192 tokens.
FORWARD_INTERMEDIATES, FORWARD_HIDDENS = 3, 6
# - sampler peak per logit (fp32 logits, sort keys and indices for top-k/top-p, probabilities); fitted to vLLM
#   0.19.0, Llama-3.1-8B, H100, 1024 sequences ("torch peak memory increase: 1.89GiB").
SAMPLER_BYTES_PER_LOGIT = 15.4
# - memory outside torch per GPU by tensor-parallel degree (NCCL and custom all-reduce buffers); vLLM 0.19.0 on H100
#   measured 0.25 GiB at tp 1, 2.07 at tp 2, 2.13 at tp 4 (0.13 GiB at tp 1 up to 0.17).
NON_TORCH_GIB = {1: 0.25, 2: 2.07, 4: 2.13}
NON_TORCH_GIB_BEFORE_0_18 = 0.13
# - CUDA graphs: vLLM 0.19.0 estimated 0.84 GiB for Llama-3.1-8B's 32 layers (captures up to 512 tokens).
CUDA_GRAPH_GIB_PER_LAYER = 0.84 / 32


@dataclass(frozen=True)
class VllmConfig:
    """The vLLM flags that decide KV capacity; None means the engine's default for this GPU."""

    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    dtype: str = "bf16"
    version: tuple[int, ...] = VERSION
    offline: bool = False  # the LLM class (offline) has other batch defaults than `vllm serve`


@dataclass(frozen=True)
class VllmPrediction:
    total_bytes: int
    gpu_memory_utilization: float
    requested_bytes: int
    weights_bytes: int
    forward_peak_bytes: int
    sampler_peak_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    cuda_graph_bytes: int
    cuda_graph_reserved: bool
    available_kv_bytes: int
    kv_bytes_per_token: int
    block_bytes: int
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_concurrency: float
    kv_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def default_utilization(version: tuple[int, ...]) -> float:
    """0.92 in 0.33.0 (CacheConfig); 0.9 in the releases before it was raised."""
    return 0.92 if version >= VERSION else 0.9


def batch_defaults(dev: Device, offline: bool) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) as `EngineArgs.get_batch_defaults` picks them for this GPU."""
    if dev.torch_total_bytes >= 160 * GIB:
        return 16384, 1024
    if dev.torch_total_bytes >= 70 * GIB and not dev.is_a100:
        return (16384 if offline else 8192), 1024
    return (8192 if offline else 2048), 256


def kv_element_bytes(kv_cache_dtype: str, dtype: str) -> int:
    size = KV_ELEMENT_BYTES[kv_cache_dtype]
    return DTYPE_BYTES[dtype] if size is None else size


def kv_bytes_per_token(spec: ModelSpec, cfg: VllmConfig) -> int:
    """Keys and values of one token over all layers on one GPU, as vLLM's FullAttentionSpec pages them."""
    return spec.num_layers * 2 * spec.kv_heads_per_gpu(cfg.tensor_parallel_size) * spec.head_dim * kv_element_bytes(
        cfg.kv_cache_dtype, cfg.dtype)


def weights_bytes(spec: ModelSpec, cfg: VllmConfig) -> int:
    """Parameters on one GPU plus the RoPE cos/sin cache [max_position_embeddings, head_dim] in the model dtype."""
    rope = spec.max_position_embeddings * spec.head_dim * DTYPE_BYTES[cfg.dtype]
    return spec.weights_bytes(cfg.dtype, cfg.tensor_parallel_size, embedding_split=True) + rope


def activation_bytes(spec: ModelSpec, cfg: VllmConfig, tokens: int, seqs: int) -> tuple[int, int]:
    """(forward peak, sampler peak) of `profile_run`; the reserve is the larger of the two."""
    tp = cfg.tensor_parallel_size
    per_token = FORWARD_INTERMEDIATES * spec.intermediate_size // tp + FORWARD_HIDDENS * spec.hidden_size
    forward = tokens * per_token * DTYPE_BYTES[cfg.dtype]
    sampler = int(min(seqs, tokens) * spec.vocab_size * SAMPLER_BYTES_PER_LOGIT)
    return forward, sampler


def non_torch_bytes(cfg: VllmConfig) -> int:
    tp = cfg.tensor_parallel_size
    if tp == 1:
        gib = NON_TORCH_GIB[1] if cfg.version >= (0, 18) else NON_TORCH_GIB_BEFORE_0_18
    else:
        gib = NON_TORCH_GIB[2] if tp == 2 else NON_TORCH_GIB[4]
    return int(gib * GIB)


def cuda_graph_bytes(spec: ModelSpec, cfg: VllmConfig) -> int:
    return 0 if cfg.enforce_eager else int(CUDA_GRAPH_GIB_PER_LAYER * spec.num_layers * GIB)


def predict(spec: ModelSpec, cfg: VllmConfig, dev: Device) -> VllmPrediction:
    """vLLM's KV pool for this model, these flags and this GPU."""
    default_tokens, default_seqs = batch_defaults(dev, cfg.offline)
    tokens = cfg.max_num_batched_tokens or default_tokens
    seqs = cfg.max_num_seqs or default_seqs
    max_len = cfg.max_model_len or spec.max_position_embeddings
    util = cfg.gpu_memory_utilization or default_utilization(cfg.version)
    requested = math.ceil(dev.torch_total_bytes * util)
    weights = weights_bytes(spec, cfg)
    forward, sampler = activation_bytes(spec, cfg, tokens, seqs)
    activation = max(forward, sampler)
    non_torch = non_torch_bytes(cfg)
    graphs = cuda_graph_bytes(spec, cfg)
    reserved = cfg.version >= CUDA_GRAPH_RESERVE_SINCE and not cfg.enforce_eager
    if cfg.kv_cache_memory_bytes is not None:
        available = cfg.kv_cache_memory_bytes
    else:
        available = requested - weights - activation - non_torch - (graphs if reserved else 0)
    per_token = kv_bytes_per_token(spec, cfg)
    block = per_token * BLOCK_SIZE
    blocks = max(0, available) // block
    concurrency = blocks / math.ceil(max_len / BLOCK_SIZE)
    return VllmPrediction(
        total_bytes=dev.torch_total_bytes, gpu_memory_utilization=util, requested_bytes=requested,
        weights_bytes=weights, forward_peak_bytes=forward, sampler_peak_bytes=sampler, activation_bytes=activation,
        non_torch_bytes=non_torch, cuda_graph_bytes=graphs, cuda_graph_reserved=reserved,
        available_kv_bytes=available, kv_bytes_per_token=per_token, block_bytes=block, num_blocks=blocks,
        max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=tokens, max_concurrency=concurrency,
        kv_tokens=int(concurrency * max_len))


def utilization_for(spec: ModelSpec, cfg: VllmConfig, dev: Device, kv_bytes: int) -> float:
    """The smallest --gpu-memory-utilization (to 3 decimals) whose pool holds `kv_bytes`."""
    base = predict(spec, replace(cfg, gpu_memory_utilization=1.0), dev)
    non_kv = base.requested_bytes - base.available_kv_bytes
    return math.ceil((non_kv + kv_bytes) / dev.torch_total_bytes * 1000) / 1000
