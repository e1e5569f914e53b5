"""`--from-log`: the engine's start-up capacity lines beside kvscope's prediction for the same flags, line by line,
with the reason for each difference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from kvscope.engines.advice import Advice, Request
from kvscope.engines.advise import advise
from kvscope.engines.logs import GIB, LogFacts

KV_DTYPE_FROM_ENGINE = {"auto": None, "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp8": "fp8",
                        "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}


@dataclass(frozen=True)
class Line:
    quantity: str
    log: float
    kvscope: float
    unit: str
    why: str

    @property
    def error(self) -> float | None:
        return None if not self.log else (self.kvscope - self.log) / self.log

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error}


def request_from_log(facts: LogFacts, base: Request) -> Request:
    """The request the log describes; flags given on the command line win over what the log says."""
    v = facts.values
    changes: dict = {}
    if base.max_model_len is None:
        changes["max_model_len"] = v.get("max_model_len") or v.get("context_len")
    if base.tp == 1 and v.get("tp"):
        changes["tp"] = v["tp"]
    if base.kv_dtype is None and v.get("kv_cache_dtype"):
        changes["kv_dtype"] = KV_DTYPE_FROM_ENGINE.get(v["kv_cache_dtype"])
    if base.memory_fraction is None:
        changes["memory_fraction"] = v.get("gpu_memory_utilization") or v.get("mem_fraction_static")
    if base.batched_tokens is None and v.get("chunked_prefill_size", 0) > 0:
        changes["batched_tokens"] = v["chunked_prefill_size"]
    if not base.no_cuda_graphs and v.get("enforce_eager"):
        changes["no_cuda_graphs"] = True
    if v.get("llm_class") and not v.get("api_server"):
        changes["offline"] = True  # the LLM class has larger batch defaults than `vllm serve`
    if base.engine_version is None and v.get("version"):
        changes["engine_version"] = v["version"]
    return replace(base, **{k: val for k, val in changes.items() if val is not None})


def _gib(n: int | float) -> float:
    return n / GIB


def vllm_lines(facts: LogFacts, a: Advice) -> list[Line]:
    p, v, out = a.prediction, facts.values, []
    pairs = [("weights", "weights_gib", _gib(p["weights_bytes"]), "parameters + RoPE cache: exact arithmetic"),
             ("activation peak", "activation_gib", _gib(p["activation_bytes"]),
              "measured by profile_run; kvscope fits max(forward, sampler) to published logs"),
             ("non-torch memory", "non_torch_gib", _gib(p["non_torch_bytes"]),
              "NCCL and attention workspaces, measured by vLLM; kvscope uses a per-tp calibration"),
             ("available KV cache memory", "available_kv_gib", _gib(p["available_kv_bytes"]),
              "budget - the rows above: any difference above, plus the GPU total (CUDA's, which vLLM scales by "
              "--gpu-memory-utilization)")]
    for name, key, mine, why in pairs:
        if key in v:
            out.append(Line(name, v[key], round(mine, 2), "GiB", why))
    if "kv_tokens" in v:
        out.append(Line("GPU KV cache size", v["kv_tokens"], a.kv_tokens, "tokens",
                        "available memory / (layers x block of 16 x 2 x KV heads x head_dim x dtype bytes)"))
    if "max_concurrency" in v:
        out.append(Line("maximum concurrency", v["max_concurrency"], round(a.max_concurrency, 2), "x",
                        f"KV tokens / {a.max_model_len:,} tokens per request"))
    return out


def sglang_lines(facts: LogFacts, a: Advice) -> list[Line]:
    p, v, out = a.prediction, facts.values, []
    pairs = [("free before weights (B)", "pre_load_free_gib", _gib(p["pre_load_free_bytes"]),
              "kvscope assumes CUDA total - 0.57 GiB; other processes on the GPU lower it"),
             ("weights (mem usage)", "weights_gib", _gib(p["weights_bytes"]),
              "parameters + fp32 RoPE cache; SGLang measures free memory before and after loading"),
             ("free after weights", "after_weights_gib", _gib(p["after_weights_bytes"]), "B - weights")]
    for name, key, mine, why in pairs:
        if key in v:
            out.append(Line(name, v[key], round(mine, 2), "GB (GiB)", why))
    if "mem_fraction_static" in v:
        out.append(Line("mem_fraction_static", v["mem_fraction_static"], p["mem_fraction_static"], "",
                        "the log's server_args; kvscope used the same value"))
    tokens = v.get("max_total_num_tokens", v.get("kv_tokens"))
    if tokens is not None:
        out.append(Line("max_total_num_tokens", tokens, a.kv_tokens, "tokens",
                        f"(free after weights - B x (1 - fraction)) / {p['cell_bytes']:,} B per token: a GiB of "
                        f"difference in B or the weights moves it by {GIB // p['cell_bytes']:,} tokens"))
    if "max_running_requests" in v:
        out.append(Line("max_running_requests", v["max_running_requests"], p["max_running_requests"], "",
                        f"SGLang {a.version}'s rule: min(max(min(tokens / context x 512, 4096), 2048), tokens // 2)"))
    return out


def compare(facts: LogFacts, base: Request) -> tuple[Advice, list[Line]]:
    """kvscope's advice for the deployment the log shows, and the log's numbers beside its prediction."""
    req = request_from_log(facts, replace(base, engine=facts.engine))
    a = advise(req)
    lines = vllm_lines(facts, a) if facts.engine == "vllm" else sglang_lines(facts, a)
    if "error" in facts.values:
        a.warnings.append(f"the log stops with the engine's error: {facts.values['error']}")
    return a, lines
