"""SGLang's KV-pool sizing as its model runner does it (read from SGLang 0.5.23: sglang/srt/arg_groups/memory_hook.py
`handle_gpu_memory_settings` and `reserve_for_graph_mb`, sglang/srt/mem_cache/kv_cache_configurator.py
`_profile_available_bytes` and `resolve_max_num_reqs`, sglang/srt/model_executor/pool_configurator.py
`calculate_pool_sizes`, sglang/srt/distributed/bootstrap.py `measure_pre_model_load_memory`):

1. Defaults from nvidia-smi's total (MiB): --chunked-prefill-size and the decode CUDA-graph batch limit by GPU size;
   then --mem-fraction-static = round((total - reserved) / total, 3), with reserved = 512 + 1.5 * max(chunk, 2048)
   + tp * pp / 8 * 1024 + CUDA graphs (2 per decode batch size limit, 8 per captured prefill size), at least
   10 GiB on GPUs over 60 GB. SGLang 0.4 took the fraction from the tensor-parallel degree (0.88 at tp 1).
2. B = free memory after torch.distributed is up and before weights load ("Load weight begin. avail mem=B GB").
3. After the weights: available = B - weights ("Load weight end. ... avail mem"); the pool gets
   available - B * (1 - mem_fraction_static) bytes; a failure to leave any is SGLang's "Loaded weights leave no GPU
   memory for the KV cache" error.
4. max_total_num_tokens = pool // cell, cell = KV heads per GPU * (head_dim + v_head_dim) * layers * dtype bytes,
   rounded down to --page-size, capped by --max-total-tokens.
5. max_running_requests = min(max(min(tokens / context_len * 512, 4096), 2048), tokens // 2) unless given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kvscope.engines.devices import GIB, Device
from kvscope.kvformats import DTYPE_BYTES
from kvscope.models.spec import ModelSpec

VERSION = (0, 5, 23)
KV_ELEMENT_BYTES = {"auto": None, "bf16": 2, "bfloat16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}
# Free memory before the weights load is the total less the CUDA context and NCCL: 0.37-0.75 GiB on an H100 in
# SGLang's own docs and logs (78.81, 78.59 and 78.43 GB free of 79.18); the mean is used.
CONTEXT_GIB = 0.57
TP_FRACTION_0_4 = {1: 0.88, 2: 0.87, 4: 0.85, 8: 0.81, 16: 0.79}


@dataclass(frozen=True)
class SglangConfig:
    """The SGLang flags that decide the pool; None means the engine's default for this GPU."""

    mem_fraction_static: float | None = None
    context_length: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    kv_cache_dtype: str = "auto"
    tp_size: int = 1
    disable_cuda_graph: bool = False
    page_size: int = 1
    max_total_tokens: int | None = None
    dtype: str = "bf16"
    version: tuple[int, ...] = VERSION


@dataclass(frozen=True)
class SglangPrediction:
    smi_total_mib: float
    chunked_prefill_size: int
    cuda_graph_max_bs: int
    reserved_mib: float
    mem_fraction_static: float
    pre_load_free_bytes: int  # B
    weights_bytes: int
    after_weights_bytes: int
    headroom_bytes: int  # B * (1 - mem_fraction_static): activations, CUDA graphs, sampling
    pool_bytes: int
    cell_bytes: int
    max_total_num_tokens: int
    context_len: int
    max_running_requests: int

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_and_graph_defaults(smi_mib: float, tp: int) -> tuple[int, int]:
    """(--chunked-prefill-size, decode CUDA-graph max batch) by GPU size, as handle_gpu_memory_settings picks them."""
    big_tp = tp >= 4
    if smi_mib < 20 * 1024:
        return 2048, 8
    if smi_mib < 35 * 1024:
        return 4096, 160 if big_tp else 48
    if smi_mib < 60 * 1024:
        return 4096, 160 if big_tp else 32
    if smi_mib < 160 * 1024:
        return 8192, 512 if big_tp else 256
    return 16384, 512


def prefill_graph_sizes(max_tokens: int) -> int:
    """How many prefill CUDA graphs 0.5.23 captures up to `max_tokens` (generate_prefill_cuda_graph_batch_sizes)."""
    sizes = (list(range(4, 33, 4)) + list(range(48, 257, 16)) + list(range(288, 513, 32)) + list(range(576, 1025, 64))
             + list(range(1280, 4097, 256)) + list(range(4608, max_tokens + 1, 512)))
    return sum(1 for s in sizes if s <= max_tokens)


def reserved_mib(smi_mib: float, chunk: int, max_bs: int, cfg: SglangConfig) -> float:
    reserved = 512 + max(chunk, 2048) * 1.5 + cfg.tp_size / 8 * 1024
    if not cfg.disable_cuda_graph:
        reserved += max_bs * 2 + prefill_graph_sizes(chunk) * 8
    if smi_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return reserved


def default_fraction(smi_mib: float, chunk: int, max_bs: int, cfg: SglangConfig) -> tuple[float, float]:
    """(mem_fraction_static, reserved MiB) that SGLang picks when --mem-fraction-static is not given."""
    if cfg.version < (0, 5):
        tp = max(k for k in TP_FRACTION_0_4 if k <= cfg.tp_size)
        return TP_FRACTION_0_4[tp], smi_mib * (1 - TP_FRACTION_0_4[tp])
    reserved = reserved_mib(smi_mib, chunk, max_bs, cfg)
    return round((smi_mib - reserved) / smi_mib, 3), reserved


def cell_bytes(spec: ModelSpec, cfg: SglangConfig) -> int:
    size = KV_ELEMENT_BYTES[cfg.kv_cache_dtype] or DTYPE_BYTES[cfg.dtype]
    return spec.kv_heads_per_gpu(cfg.tp_size) * 2 * spec.head_dim * spec.num_layers * size


def weights_bytes(spec: ModelSpec, cfg: SglangConfig) -> int:
    """Parameters on one GPU plus the fp32 RoPE cos/sin cache [max_position_embeddings, head_dim]."""
    # SGLang's vocabulary-parallel embedding and head are split across ranks
    weights = spec.weights_bytes(cfg.dtype, cfg.tp_size, embedding_split=True)
    return weights + spec.max_position_embeddings * spec.head_dim * 4


def max_running(tokens: int, context_len: int, requested: int | None) -> int:
    estimated = max(min(int(tokens / context_len * 512), 4096), 2048)
    return min(requested if requested is not None else estimated, tokens // 2)


def predict(spec: ModelSpec, cfg: SglangConfig, dev: Device) -> SglangPrediction:
    """SGLang's pool for this model, these flags and this GPU."""
    default_chunk, max_bs = chunk_and_graph_defaults(dev.smi_total_mib, cfg.tp_size)
    chunk = cfg.chunked_prefill_size or default_chunk
    if cfg.max_running_requests is not None:
        max_bs = min(max_bs, cfg.max_running_requests)
    fraction, reserved = default_fraction(dev.smi_total_mib, chunk, max_bs, cfg)
    fraction = cfg.mem_fraction_static or fraction
    pre_load = dev.torch_total_bytes - int(CONTEXT_GIB * GIB)
    weights = weights_bytes(spec, cfg)
    headroom = int(pre_load * (1 - fraction))
    pool = pre_load - weights - headroom
    cell = cell_bytes(spec, cfg)
    tokens = max(0, pool) // cell // cfg.page_size * cfg.page_size
    if cfg.max_total_tokens is not None:
        tokens = min(tokens, cfg.max_total_tokens)
    context = cfg.context_length or spec.max_position_embeddings
    return SglangPrediction(
        smi_total_mib=dev.smi_total_mib, chunked_prefill_size=chunk, cuda_graph_max_bs=max_bs,
        reserved_mib=reserved, mem_fraction_static=fraction, pre_load_free_bytes=pre_load, weights_bytes=weights,
        after_weights_bytes=pre_load - weights, headroom_bytes=headroom, pool_bytes=pool, cell_bytes=cell,
        max_total_num_tokens=tokens, context_len=context,
        max_running_requests=max_running(tokens, context, cfg.max_running_requests) if tokens else 0)


def fraction_for(spec: ModelSpec, cfg: SglangConfig, dev: Device, pool_bytes: int) -> float:
    """The smallest --mem-fraction-static (to 3 decimals) whose pool holds `pool_bytes`."""
    p = predict(spec, cfg, dev)
    # pool = after_weights - B * (1 - f)  =>  f = 1 - (after_weights - pool) / B
    needed = 1 - (p.after_weights_bytes - pool_bytes) / p.pre_load_free_bytes
    return math.ceil(needed * 1000) / 1000
