"""`kvscope advise --engine vllm`: vLLM's own accounting (engines/vllm_memory.py) turned into its flags."""

from __future__ import annotations

import math
from dataclasses import replace

from kvscope.engines import advice
from kvscope.engines import vllm_memory as vm
from kvscope.engines.advice import Advice, Fix, Request, Row
from kvscope.engines.devices import GIB, Device, device
from kvscope.errors import usage
from kvscope.models.spec import ModelSpec
from kvscope.planner.sizes import format_bytes

OLDEST = (0, 10)
KV_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "fp8"}  # kvscope name -> vLLM --kv-cache-dtype
CHOICES = "auto, float16, bfloat16, fp8, fp8_e4m3, fp8_e5m2, fp8_inc, ..."
KV_MEMORY_FLAG_SINCE = (0, 14)  # --kv-cache-memory-bytes: in 0.14.1 (vllm-ascend #6375 ports it) and 0.33.0
UTIL_CEILING = 0.98  # vLLM accepts up to 1.0, but the CUDA context and allocator slack live outside the budget


def config_from(req: Request, spec: ModelSpec) -> vm.VllmConfig:
    """The vLLM config for this request; combinations vLLM refuses are refused with vLLM's reason."""
    version = advice.parse_version(req.engine_version, vm.VERSION, "vLLM", OLDEST)
    kv = req.kv_dtype or req.dtype
    if kv not in KV_DTYPES:
        raise usage(f"vLLM has no {kv} KV cache: argument --kv-cache-dtype: invalid choice {kv!r} (choose from "
                    f"{CHOICES})", expected="--kv-dtype bf16, fp16 or fp8 with --engine vllm", fix="--kv-dtype")
    if req.memory_fraction is not None and not 0 < req.memory_fraction <= 1:
        raise usage(f"gpu_memory_utilization {req.memory_fraction} is out of range: vLLM's CacheConfig requires "
                    "0 < gpu_memory_utilization <= 1", expected="a fraction such as 0.92",
                    fix="--gpu-memory-utilization")
    if spec.num_heads % req.tp:
        raise usage(f"vLLM refuses it: Total number of attention heads ({spec.num_heads}) must be divisible by "
                    f"tensor parallel size ({req.tp}).", expected=f"a divisor of {spec.num_heads}", fix="--tp")
    derived = spec.max_position_embeddings
    if req.max_model_len is not None and req.max_model_len > derived:
        raise usage(f"vLLM refuses it: User-specified max_model_len ({req.max_model_len}) is greater than the derived "
                    f"max_model_len (max_position_embeddings={derived} or model_max_length=None in model's "
                    "config.json). To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1",
                    expected=f"--max-model-len <= {derived}", fix="--max-model-len")
    return vm.VllmConfig(gpu_memory_utilization=req.memory_fraction, max_model_len=req.max_model_len,
                         max_num_seqs=req.concurrency, max_num_batched_tokens=req.batched_tokens,
                         kv_cache_dtype=KV_DTYPES[kv] if kv != req.dtype else "auto", tensor_parallel_size=req.tp,
                         enforce_eager=req.no_cuda_graphs, dtype=req.dtype, version=version, offline=req.offline)


def check_batch(p: vm.VllmPrediction) -> None:
    if p.max_num_batched_tokens < p.max_num_seqs:
        raise usage(f"vLLM refuses it: max_num_batched_tokens ({p.max_num_batched_tokens}) must be greater than or "
                    f"equal to max_num_seqs ({p.max_num_seqs}).", expected="--max-num-batched-tokens >= --concurrency",
                    fix="--max-num-batched-tokens or --concurrency")


def rows(p: vm.VllmPrediction, cfg: vm.VllmConfig, spec: ModelSpec) -> list[Row]:
    tp = cfg.tensor_parallel_size
    graphs = ("taken off (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1, default since 0.21.0)" if p.cuda_graph_reserved
              else "not taken off: --enforce-eager" if cfg.enforce_eager
              else "captured after the pool is sized (before 0.21.0): must fit in the 1 - utilization margin")
    return [
        Row("GPU total (CUDA)", p.total_bytes, "torch.cuda.mem_get_info() total"),
        Row("budget", p.requested_bytes, f"ceil(total x --gpu-memory-utilization {p.gpu_memory_utilization:g})"),
        Row("weights", p.weights_bytes, f"{spec.num_params():,} parameters / tp {tp} + RoPE cache, {cfg.dtype}"),
        Row("activation peak", p.activation_bytes,
            f"profile_run: max(forward of {p.max_num_batched_tokens} tokens {format_bytes(p.forward_peak_bytes)}, "
            f"sampler over {min(p.max_num_seqs, p.max_num_batched_tokens)} sequences "
            f"{format_bytes(p.sampler_peak_bytes)})"),
        Row("non-torch (NCCL, workspaces)", p.non_torch_bytes, f"measured by vLLM at tp {tp}; kvscope's calibration"),
        Row("CUDA graphs", p.cuda_graph_bytes, graphs),
        Row("available KV cache memory", p.available_kv_bytes,
            "--kv-cache-memory-bytes" if cfg.kv_cache_memory_bytes else "budget - the rows above"),
        Row("KV per token", p.kv_bytes_per_token,
            f"{spec.num_layers} layers x 2 x {spec.kv_heads_per_gpu(tp)} KV heads x {spec.head_dim} x "
            f"{vm.kv_element_bytes(cfg.kv_cache_dtype, cfg.dtype)} B ({cfg.kv_cache_dtype})"),
        Row("GPU KV cache size (tokens)", None,
            f"{p.kv_tokens:,} tokens in {p.num_blocks:,} blocks of {vm.BLOCK_SIZE}"),
    ]


def refusal(p: vm.VllmPrediction) -> str | None:
    """vLLM's start-up error for this prediction, in its words (kv_cache_planning.py)."""
    if p.available_kv_bytes <= 0:
        return ("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing "
                "the engine.")
    needed = math.ceil(p.max_model_len / vm.BLOCK_SIZE) * p.block_bytes
    if needed > p.available_kv_bytes:
        longest = p.available_kv_bytes // p.kv_bytes_per_token // vm.BLOCK_SIZE * vm.BLOCK_SIZE
        return (f"To serve at least one request with the model's max seq len ({p.max_model_len}), "
                f"({needed / GIB:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
                f"({p.available_kv_bytes / GIB:.2f} GiB). Based on the available memory, the estimated maximum model "
                f"length is {longest}.")
    return None


def fixes(spec: ModelSpec, cfg: vm.VllmConfig, dev: Device, p: vm.VllmPrediction, want: int) -> list[Fix]:
    """Each way to hold `want` requests of max_model_len, re-predicted; those that fit first."""
    blocks_per_req = math.ceil(p.max_model_len / vm.BLOCK_SIZE)
    needed = want * blocks_per_req * vm.BLOCK_SIZE
    out: list[Fix] = []

    def add(action: str, flags: str, new: vm.VllmConfig, requests: int = want) -> None:
        q = vm.predict(spec, new, dev)
        fits = q.num_blocks >= requests * math.ceil(q.max_model_len / vm.BLOCK_SIZE)
        out.append(Fix(action, flags, requests * q.max_model_len, p.kv_tokens, q.kv_tokens, fits))

    util = vm.utilization_for(spec, cfg, dev, needed * p.kv_bytes_per_token)
    if p.gpu_memory_utilization < util <= UTIL_CEILING:
        add(f"raise the budget to {util:g} of the GPU", f"--gpu-memory-utilization {util:g}",
            replace(cfg, gpu_memory_utilization=util))
    if cfg.kv_cache_dtype not in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        add("store the KV cache as fp8 (half the bytes per token)", "--kv-cache-dtype fp8",
            replace(cfg, kv_cache_dtype="fp8"))
    if (fit := p.num_blocks // blocks_per_req) >= 1:
        add(f"admit {fit} sequences of {p.max_model_len} tokens", f"--max-num-seqs {fit}",
            replace(cfg, max_num_seqs=fit), fit)
    if (longest := p.num_blocks // want * vm.BLOCK_SIZE) >= vm.BLOCK_SIZE:
        add(f"shorten the context to {longest} tokens", f"--max-model-len {longest}",
            replace(cfg, max_model_len=longest))
    for tp in advice.tp_options(spec, cfg.tensor_parallel_size):
        add(f"split the model over {tp} GPUs", f"--tensor-parallel-size {tp}", replace(cfg, tensor_parallel_size=tp))
        if out[-1].fits:
            break
    return sorted(out, key=lambda f: not f.fits)


def command(model: str, cfg: vm.VllmConfig, p: vm.VllmPrediction, kv_bytes: int | None = None) -> tuple[str, dict]:
    flags = {"--gpu-memory-utilization": f"{p.gpu_memory_utilization:g}", "--max-model-len": str(p.max_model_len),
             "--max-num-seqs": str(p.max_num_seqs), "--max-num-batched-tokens": str(p.max_num_batched_tokens),
             "--kv-cache-dtype": cfg.kv_cache_dtype, "--tensor-parallel-size": str(cfg.tensor_parallel_size)}
    if kv_bytes is not None:
        flags = {k: v for k, v in flags.items() if k != "--gpu-memory-utilization"} | {
            "--kv-cache-memory-bytes": str(kv_bytes)}
    return advice.launch_line(f"vllm serve {model}", flags, cfg.dtype, "--enforce-eager" if cfg.enforce_eager else None)


def advise_vllm(req: Request) -> Advice:
    spec, model = advice.resolve_model(req.model)
    cfg = config_from(req, spec)
    dev = device(req.gpu, req.gpu_memory)
    p = vm.predict(spec, cfg, dev)
    check_batch(p)
    stop = refusal(p)
    want = req.concurrency
    blocks_per_req = math.ceil(p.max_model_len / vm.BLOCK_SIZE)
    fits = None if want is None else (stop is None and p.num_blocks >= want * blocks_per_req)
    line, flags = command(model, cfg, p)
    warnings = [f"GPU total estimated: {dev.source}"] if dev.estimated else []
    margin = p.total_bytes - p.requested_bytes
    if not p.cuda_graph_reserved and not cfg.enforce_eager and margin < p.cuda_graph_bytes + GIB // 2:
        warnings.append(f"CUDA graphs (~{format_bytes(p.cuda_graph_bytes)}) and the CUDA context (~0.5 GiB) must fit "
                        f"in the {format_bytes(margin)} outside the budget in vLLM {advice.version_text(cfg.version)}: "
                        "lower --gpu-memory-utilization or add --enforce-eager")
    alternative = None
    if want and fits and cfg.version >= KV_MEMORY_FLAG_SINCE:
        kv_bytes = (want * blocks_per_req + 1) * p.block_bytes  # +1: the null block vLLM's block pool holds back
        alternative = command(model, cfg, p, kv_bytes)[0]
    return Advice(
        engine="vllm", version=advice.version_text(cfg.version), model=model, device=dev.to_dict(),
        rows=rows(p, cfg, spec), kv_tokens=p.kv_tokens, max_model_len=p.max_model_len,
        max_concurrency=p.max_concurrency, concurrency=want,
        needed_tokens=None if want is None else want * p.max_model_len, fits=fits, refusal=stop, flags=flags,
        command=line, alternative=alternative,
        fixes=fixes(spec, cfg, dev, p, want or 1) if (fits is False or stop) else [], warnings=warnings,
        prediction=p.to_dict())
