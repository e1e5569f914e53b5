"""`kvscope advise --engine sglang`: SGLang's own accounting (engines/sglang_memory.py) turned into its flags."""

from __future__ import annotations

from dataclasses import replace

from kvscope.engines import advice
from kvscope.engines import sglang_memory as sm
from kvscope.engines.advice import Advice, Fix, Request, Row
from kvscope.engines.devices import Device, device
from kvscope.errors import usage
from kvscope.models.spec import ModelSpec
from kvscope.planner.memory import prefill_bytes_per_token
from kvscope.planner.sizes import format_bytes

OLDEST = (0, 4)
KV_DTYPES = {"bf16": "bf16", "fp16": "auto", "fp8": "fp8_e4m3"}  # kvscope name -> SGLang --kv-cache-dtype
CHOICES = "auto, fp8_e5m2, fp8_e4m3, mxfp8, bf16, bfloat16, nvfp4, fp4_mx_block16"
FRACTION_CEILING = 0.95  # above this the headroom cannot hold a prefill chunk's activations on any GPU listed


def config_from(req: Request, spec: ModelSpec) -> sm.SglangConfig:
    """The SGLang config for this request; combinations SGLang refuses are refused with SGLang's reason."""
    version = advice.parse_version(req.engine_version, sm.VERSION, "SGLang", OLDEST)
    kv = req.kv_dtype or req.dtype
    if kv not in KV_DTYPES or (kv == "fp16" and req.dtype != "fp16"):
        raise usage(f"SGLang has no {kv} KV cache here: argument --kv-cache-dtype: invalid choice {kv!r} (choose from "
                    f"{CHOICES})", expected="--kv-dtype bf16 or fp8 with --engine sglang (fp16 only with --dtype fp16)",
                    fix="--kv-dtype")
    if req.memory_fraction is not None and not 0 < req.memory_fraction < 1:
        raise usage(f"--mem-fraction-static {req.memory_fraction} is not a fraction of the GPU",
                    expected="0 < --mem-fraction-static < 1", fix="--mem-fraction-static")
    if spec.num_heads % req.tp:
        raise usage(f"SGLang refuses it: {spec.num_heads} is not divisible by {req.tp} (its tensor-parallel attention "
                    "splits the heads evenly)", expected=f"a divisor of {spec.num_heads}", fix="--tp")
    derived = spec.max_position_embeddings
    if req.max_model_len is not None and req.max_model_len > derived:
        raise usage(f"SGLang refuses it: User-specified context_length ({req.max_model_len}) is greater than the "
                    f"derived context_length ({derived}). To allow overriding this maximum, set the env var "
                    "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1", expected=f"--max-model-len <= {derived}",
                    fix="--max-model-len")
    return sm.SglangConfig(mem_fraction_static=req.memory_fraction, context_length=req.max_model_len,
                           max_running_requests=req.concurrency, chunked_prefill_size=req.batched_tokens,
                           kv_cache_dtype="auto" if kv == req.dtype else KV_DTYPES[kv], tp_size=req.tp,
                           disable_cuda_graph=req.no_cuda_graphs, dtype=req.dtype, version=version)


def activation_estimate(spec: ModelSpec, cfg: sm.SglangConfig, p: sm.SglangPrediction) -> int:
    """kvscope's estimate of what the headroom must hold: one prefill chunk's activations (the planner's per-token
    count of the transformers forward pass, a close stand-in for SGLang's) plus SGLang's own CUDA-graph reserve."""
    graphs = 0 if cfg.disable_cuda_graph else (p.cuda_graph_max_bs * 2 + sm.prefill_graph_sizes(
        p.chunked_prefill_size) * 8) * 1024**2
    return p.chunked_prefill_size * prefill_bytes_per_token(spec, cfg.dtype, cfg.tp_size) + graphs


def headroom_holds(spec: ModelSpec, cfg: sm.SglangConfig, dev: Device) -> bool:
    q = sm.predict(spec, cfg, dev)
    return q.headroom_bytes >= activation_estimate(spec, cfg, q)


def rows(p: sm.SglangPrediction, cfg: sm.SglangConfig, spec: ModelSpec, given: bool) -> list[Row]:
    how = ("--mem-fraction-static as given" if given else
           f"round((nvidia-smi {p.smi_total_mib:,.0f} MiB - reserved {p.reserved_mib:,.0f} MiB) / total, 3)"
           if cfg.version >= (0, 5) else f"SGLang {advice.version_text(cfg.version)}'s default for tp {cfg.tp_size}")
    return [
        Row("free before weights (B)", p.pre_load_free_bytes, "CUDA total less the CUDA context and NCCL (~0.57 GiB)"),
        Row("weights", p.weights_bytes, f"{spec.num_params():,} parameters / tp {cfg.tp_size} + fp32 RoPE cache"),
        Row(f"headroom B x (1 - {p.mem_fraction_static:g})", p.headroom_bytes,
            f"mem_fraction_static {p.mem_fraction_static:g}: {how}; activations at --chunked-prefill-size "
            f"{p.chunked_prefill_size}, CUDA graphs up to batch {p.cuda_graph_max_bs}"),
        Row("activations + graphs (kvscope estimate)", activation_estimate(spec, cfg, p),
            "what the headroom must hold"),
        Row("KV pool", p.pool_bytes, "B - weights - headroom"),
        Row("KV per token (cell)", p.cell_bytes, f"{spec.kv_heads_per_gpu(cfg.tp_size)} KV heads x 2 x "
            f"{spec.head_dim} x {spec.num_layers} layers ({cfg.kv_cache_dtype})"),
        Row("max_total_num_tokens", None, f"{p.max_total_num_tokens:,} tokens; max_running_requests "
            f"{p.max_running_requests:,}"),
    ]


def fixes(spec: ModelSpec, cfg: sm.SglangConfig, dev: Device, p: sm.SglangPrediction, want: int) -> list[Fix]:
    needed = want * p.context_len
    out: list[Fix] = []

    def add(action: str, flags: str, new: sm.SglangConfig, requests: int = want) -> None:
        q = sm.predict(spec, new, dev)
        out.append(Fix(action, flags, requests * q.context_len, p.max_total_num_tokens, q.max_total_num_tokens,
                       q.max_total_num_tokens >= requests * q.context_len))

    fraction = sm.fraction_for(spec, cfg, dev, needed * p.cell_bytes)
    raised = replace(cfg, mem_fraction_static=fraction)
    # only while the smaller headroom still holds a prefill chunk and the CUDA graphs
    if p.mem_fraction_static < fraction <= FRACTION_CEILING and headroom_holds(spec, raised, dev):
        add(f"raise the static fraction to {fraction:g}", f"--mem-fraction-static {fraction:g}", raised)
    if cfg.kv_cache_dtype not in ("fp8_e4m3", "fp8_e5m2"):
        add("store the KV cache as fp8 (half the bytes per token)", "--kv-cache-dtype fp8_e4m3",
            replace(cfg, kv_cache_dtype="fp8_e4m3"))
    if (fit := p.max_total_num_tokens // p.context_len) >= 1:
        add(f"run {fit} requests of {p.context_len} tokens at once", f"--max-running-requests {fit}",
            replace(cfg, max_running_requests=fit), fit)
    if (longest := p.max_total_num_tokens // want) >= 1:
        add(f"shorten the context to {longest} tokens", f"--context-length {longest}",
            replace(cfg, context_length=longest))
    for tp in advice.tp_options(spec, cfg.tp_size):
        add(f"split the model over {tp} GPUs", f"--tp-size {tp}", replace(cfg, tp_size=tp))
        if out[-1].fits:
            break
    return sorted(out, key=lambda f: not f.fits)


def command(model: str, cfg: sm.SglangConfig, p: sm.SglangPrediction, want: int | None) -> tuple[str, dict]:
    flags = {"--mem-fraction-static": f"{p.mem_fraction_static:g}", "--context-length": str(p.context_len),
             "--max-running-requests": str(want or p.max_running_requests),
             "--chunked-prefill-size": str(p.chunked_prefill_size), "--kv-cache-dtype": cfg.kv_cache_dtype,
             "--tp-size": str(cfg.tp_size)}
    return advice.launch_line(f"python -m sglang.launch_server --model-path {model}", flags, cfg.dtype,
                       "--disable-cuda-graph" if cfg.disable_cuda_graph else None)


def advise_sglang(req: Request) -> Advice:
    spec, model = advice.resolve_model(req.model)
    cfg = config_from(req, spec)
    dev = device(req.gpu, req.gpu_memory)
    p = sm.predict(spec, cfg, dev)
    stop = None
    if p.pool_bytes <= 0:
        need = 1 - p.after_weights_bytes / p.pre_load_free_bytes
        stop = (f"Loaded weights leave no GPU memory for the KV cache under --mem-fraction-static="
                f"{p.mem_fraction_static:g}. Raise --mem-fraction-static above {need:.3f}")
    want = req.concurrency
    fits = None if want is None else (stop is None and p.max_total_num_tokens >= want * p.context_len)
    warnings = [f"GPU total estimated: {dev.source}"] if dev.estimated else []
    need_headroom = activation_estimate(spec, cfg, p)
    if stop is None and p.headroom_bytes < need_headroom:
        warnings.append(f"the headroom B x (1 - mem_fraction_static) = {format_bytes(p.headroom_bytes)} is under "
                        f"kvscope's estimate of a {p.chunked_prefill_size}-token prefill chunk plus CUDA graphs "
                        f"({format_bytes(need_headroom)}): expect an OOM under load; lower --mem-fraction-static or "
                        "--chunked-prefill-size")
    line, flags = command(model, cfg, p, want)
    return Advice(
        engine="sglang", version=advice.version_text(cfg.version), model=model, device=dev.to_dict(),
        rows=rows(p, cfg, spec, req.memory_fraction is not None), kv_tokens=p.max_total_num_tokens,
        max_model_len=p.context_len, max_concurrency=p.max_total_num_tokens / p.context_len, concurrency=want,
        needed_tokens=None if want is None else want * p.context_len, fits=fits, refusal=stop, flags=flags,
        command=line, alternative=None,
        fixes=fixes(spec, cfg, dev, p, want or 1) if (fits is False or stop) else [], warnings=warnings,
        prediction=p.to_dict())
