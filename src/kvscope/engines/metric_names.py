"""Prometheus metric names of vLLM, SGLang and kvscope's own server: what `kvscope watch` reads, per engine.

Names, types and labels were read from the engines' sources:
- vLLM V1, `vllm/v1/metrics/loggers.py` (`PrometheusStatLogger`) of 0.33.0 (the wheel on PyPI) and of a 0.10-era commit
  (005a810b), which still carried the names deprecated in 0.9 (`vllm:gpu_cache_usage_perc`,
  `vllm:time_per_output_token_seconds`); both are read as fallbacks. Labels: `model_name`, `engine`.
- SGLang 0.5.23, `sglang/srt/observability/metrics_collector.py` (`SchedulerMetricsCollector`,
  `TokenizerMetricsCollector`, `RadixCacheMetricsCollector`). Labels: `model_name`, `engine_type`, `tp_rank`,
  `pp_rank`, `moe_ep_rank` (+ `dp_rank`, `priority`).
- kvscope's server: the contract in docs/engines.md.

Counters are named here without the `_total` suffix, as prometheus_client's parser names their families.
"""

from __future__ import annotations

from dataclasses import dataclass

VLLM_VERSIONS = "V1 engine, 0.10 to 0.33.0"
SGLANG_VERSIONS = "0.4.x to 0.5.23"


@dataclass(frozen=True)
class MetricSet:
    """Where each quantity `watch` shows lives in one engine's /metrics; a tuple lists fallbacks, first found wins."""

    engine: str
    versions: str
    kv_usage: tuple[str, ...]  # gauge, 0..1
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    preemptions: tuple[str, ...] = ()  # counters of requests pushed out of the KV cache
    preemptions_gauge: tuple[str, ...] = ()  # older SGLang: a gauge per logging interval instead of a counter
    preempt_label: str = "preemptions"
    prefix_hits: tuple[str, ...] = ()  # counters, tokens
    prefix_queries: tuple[str, ...] = ()  # counters, tokens; None with prefix_computed: queries = hits + computed
    prefix_computed: tuple[str, ...] = ()
    prefix_hit_gauge: tuple[str, ...] = ()  # gauge 0..1 when no counters exist
    capacity_tokens: tuple[str, ...] = ()
    used_tokens: tuple[str, ...] = ()
    available_tokens: tuple[str, ...] = ()
    evictable_tokens: tuple[str, ...] = ()
    evicted_tokens: tuple[str, ...] = ()  # counter
    ttft: tuple[str, ...] = ()  # histograms, seconds
    itl: tuple[str, ...] = ()
    queue_time: tuple[str, ...] = ()
    oom_events: tuple[str, ...] = ()  # counter
    requests: tuple[str, ...] = ()  # counter with an outcome label
    info: tuple[str, ...] = ()  # info gauge whose labels describe the cache (vLLM: num_gpu_blocks, block_size)

    @property
    def prefix(self) -> str:
        return self.engine + ":"


VLLM = MetricSet(
    engine="vllm",
    versions=VLLM_VERSIONS,
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    preemptions=("vllm:num_preemptions",),
    prefix_hits=("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    prefix_queries=("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    ttft=("vllm:time_to_first_token_seconds",),
    itl=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    queue_time=("vllm:request_queue_time_seconds",),
    info=("vllm:cache_config_info",),
)

SGLANG = MetricSet(
    engine="sglang",
    versions=SGLANG_VERSIONS,
    kv_usage=("sglang:token_usage",),
    running=("sglang:num_running_reqs",),
    waiting=("sglang:num_queue_reqs",),
    preemptions=("sglang:num_retracted_requests",),
    preemptions_gauge=("sglang:num_retracted_reqs",),
    preempt_label="retractions",
    prefix_hits=("sglang:cached_tokens",),
    prefix_queries=("sglang:prompt_tokens",),
    prefix_hit_gauge=("sglang:cache_hit_rate",),
    capacity_tokens=("sglang:max_total_num_tokens",),
    used_tokens=("sglang:kv_used_tokens", "sglang:num_used_tokens"),
    available_tokens=("sglang:kv_available_tokens",),
    evictable_tokens=("sglang:kv_evictable_tokens",),
    evicted_tokens=("sglang:evicted_tokens",),
    ttft=("sglang:time_to_first_token_seconds",),
    itl=("sglang:inter_token_latency_seconds",),
    queue_time=("sglang:queue_time_seconds",),
)

KVSCOPE = MetricSet(
    engine="kvscope",
    versions="kvscope serve (this package)",
    kv_usage=("kvscope:kv_cache_usage_perc",),
    running=("kvscope:num_requests_running",),
    waiting=("kvscope:num_requests_waiting",),
    preemptions=("kvscope:session_swaps", "kvscope:session_drops"),
    preempt_label="swaps out + drops",
    prefix_hits=("kvscope:prompt_tokens_cached",),
    prefix_computed=("kvscope:prompt_tokens_computed",),
    capacity_tokens=("kvscope:kv_budget_tokens",),
    used_tokens=("kvscope:kv_used_tokens",),
    evicted_tokens=("kvscope:evicted_tokens",),
    ttft=("kvscope:time_to_first_token_seconds",),
    itl=("kvscope:inter_token_latency_seconds",),
    oom_events=("kvscope:oom_events",),
    requests=("kvscope:requests",),
)

ENGINES: dict[str, MetricSet] = {m.engine: m for m in (VLLM, SGLANG, KVSCOPE)}

# Label values that would count one quantity twice: SGLang records the total under priority="" and a breakdown per
# priority besides it; kvscope counts swaps in both directions, and only "out" pushes a session out of the cache.
SKIP_LABELS = {"priority": lambda v: v != "", "direction": lambda v: v != "out"}


def detect(family_names: set[str]) -> MetricSet | None:
    """The engine whose metrics these are: the one whose KV-usage or running-requests gauge is present."""
    for m in ENGINES.values():
        if any(n in family_names for n in m.kv_usage + m.running):
            return m
    return None
