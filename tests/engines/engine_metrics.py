"""The engines' own metric definitions, copied from their sources, rendered by prometheus_client (which both engines
use to serve /metrics), so that the text the tests parse is the text those servers send.

- vLLM 0.33.0: vllm/v1/metrics/loggers.py (PrometheusStatLogger), buckets from vllm/v1/metrics/buckets.py; labels
  model_name, engine; vllm:cache_config_info carries CacheConfig.metrics_info() as labels.
- vLLM 0.10-era (commit 005a810b of vllm/v1/metrics/loggers.py): the names deprecated in 0.9 and still served then,
  vllm:gpu_cache_usage_perc and vllm:time_per_output_token_seconds.
- SGLang 0.5.23: sglang/srt/observability/metrics_collector.py (SchedulerMetricsCollector, TokenizerMetricsCollector,
  RadixCacheMetricsCollector); scheduler labels model_name, engine_type, tp_rank, pp_rank, moe_ep_rank.
- kvscope serve: the metric contract in docs/engines.md.

A `State` holds the values a server shows at one moment; `exposition(engine, state)` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
                      0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)
SGLANG_QUEUE_BUCKETS = (0.000, 0.001, 0.005, 0.010, 0.050, 0.100, 0.200, 0.500, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50,
                        60, 70, 80, 90, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800,
                        2000, 2500)
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class State:
    """What a server reports at one moment; counters are running totals, histograms the observations so far."""

    kv_usage: float = 0.0
    running: int = 0
    waiting: int = 0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    capacity_tokens: int = 476_000
    available_tokens: int = 476_000
    evictable_tokens: int = 0
    evicted_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    oom_events: int = 0
    refused: int = 0


def _child(metric, values):
    return metric.labels(*values) if values else metric


def _histogram(registry, name, doc, labels, values, buckets, observations) -> None:
    h = _child(Histogram(name, doc, list(labels), buckets=buckets, registry=registry), values)
    for x in observations:
        h.observe(x)


def _gauge(registry, name, doc, labels, values, value) -> None:
    _child(Gauge(name, doc, list(labels), registry=registry), values).set(value)


def _counter(registry, name, doc, labels, values, total) -> None:
    c = _child(Counter(name, doc, list(labels), registry=registry), values)
    if total:
        c.inc(total)


def vllm(s: State, *, legacy: bool = False) -> str:
    """vLLM 0.33.0's names; `legacy` adds the 0.10-era deprecated names and drops their 0.33.0 replacements."""
    r, labels, values = CollectorRegistry(), ("model_name", "engine"), (MODEL, "0")
    _gauge(r, "vllm:num_requests_running", "Number of requests in model execution batches.", labels, values,
           s.running)
    _gauge(r, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, values, s.waiting)
    usage_name = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
    _gauge(r, usage_name, "KV-cache usage. 1 means 100 percent usage.", labels, values, s.kv_usage)
    _counter(r, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels,
             values, s.prefix_queries)
    _counter(r, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, values,
             s.prefix_hits)
    _counter(r, "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, values,
             s.preemptions)
    _histogram(r, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, values,
               VLLM_TTFT_BUCKETS, s.ttft)
    itl_name = "vllm:time_per_output_token_seconds" if legacy else "vllm:inter_token_latency_seconds"
    _histogram(r, itl_name, "Histogram of inter-token latency in seconds.", labels, values, VLLM_ITL_BUCKETS, s.itl)
    _histogram(r, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", labels,
               values, VLLM_REQUEST_LATENCY_BUCKETS, s.queue)
    info = {"block_size": "16", "gpu_memory_utilization": "0.92", "cache_dtype": "auto",
            "num_gpu_blocks": str(s.capacity_tokens // 16), "enable_prefix_caching": "True", "engine": "0"}
    Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info), registry=r).labels(
        **info).set(1)
    return generate_latest(r).decode()


SGLANG_LABELS = ("model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank")
SGLANG_VALUES = (MODEL, "unified", "0", "0", "0")


def sglang(s: State) -> str:
    """SGLang 0.5.23's scheduler, tokenizer and radix-cache collectors."""
    r, labels, values = CollectorRegistry(), SGLANG_LABELS, SGLANG_VALUES
    _gauge(r, "sglang:num_running_reqs", "The number of running requests.", labels, values, s.running)
    _gauge(r, "sglang:num_queue_reqs", "The number of requests in the waiting queue.", labels, values, s.waiting)
    hit_rate = s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
    _gauge(r, "sglang:cache_hit_rate", "The prefix cache hit rate.", labels, values, hit_rate)
    used = s.capacity_tokens - s.available_tokens - s.evictable_tokens
    _gauge(r, "sglang:token_usage", "The token usage.", labels, values, round(used / s.capacity_tokens, 2))
    _gauge(r, "sglang:num_used_tokens", "The number of used tokens.", labels, values, used)
    _gauge(r, "sglang:kv_available_tokens", "Number of free token slots in the KV cache pool.", labels, values,
           s.available_tokens)
    _gauge(r, "sglang:kv_evictable_tokens", "Number of evictable (radix-cached) token slots in the KV cache pool.",
           labels, values, s.evictable_tokens)
    _gauge(r, "sglang:kv_used_tokens", "Number of actively used token slots in the KV cache pool.", labels, values,
           used)
    _gauge(r, "sglang:num_retracted_reqs", "The number of retracted requests.", labels, values, 0)
    _counter(r, "sglang:num_retracted_requests_total", "Total number of retracted requests.", labels, values,
             s.preemptions)
    _gauge(r, "sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.", labels, values,
           s.capacity_tokens)
    _histogram(r, "sglang:queue_time_seconds", "Histogram of queueing time in seconds.", labels, values,
               SGLANG_QUEUE_BUCKETS, s.queue)
    _counter(r, "sglang:evicted_tokens_total", "The number of device KV token slots freed by eviction, regardless of "
             "whether the data was backed up to host (see sglang:hicache_backup_tokens_total) or destroyed (see "
             "sglang:hicache_dropped_tokens_total).", labels, values, s.evicted_tokens)
    tok_labels, tok_values = ("model_name", "is_streaming"), (MODEL, "True")
    _counter(r, "sglang:prompt_tokens_total", "Number of prefill tokens processed.", tok_labels, tok_values,
             s.prefix_queries)
    _counter(r, "sglang:cached_tokens_total", "Number of cached prompt tokens by source (device/host/storage).",
             ("model_name", "cache_source"), (MODEL, "device"), s.prefix_hits)
    _histogram(r, "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", tok_labels,
               tok_values, SGLANG_TTFT_BUCKETS, s.ttft)
    _histogram(r, "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
               ("model_name",), (MODEL,), SGLANG_ITL_BUCKETS, s.itl)
    return generate_latest(r).decode()


def kvscope(s: State) -> str:
    """kvscope serve's contract (docs/engines.md)."""
    r, labels, values = CollectorRegistry(), (), ()
    used = s.capacity_tokens - s.available_tokens
    for name, value in (("kvscope:kv_cache_usage_perc", s.kv_usage), ("kvscope:kv_used_tokens", used),
                        ("kvscope:kv_budget_tokens", s.capacity_tokens), ("kvscope:kv_used_bytes", used * 131072),
                        ("kvscope:kv_budget_bytes", s.capacity_tokens * 131072),
                        ("kvscope:num_requests_running", s.running), ("kvscope:num_requests_waiting", s.waiting)):
        _gauge(r, name, name.split(":")[1].replace("_", " "), labels, values, value)
    sessions = Gauge("kvscope:sessions", "sessions by state", ["state"], registry=r)
    for state, n in (("active", s.running), ("idle", 3), ("swapped", 1)):
        sessions.labels(state).set(n)
    cached, computed = s.prefix_hits, s.prefix_queries - s.prefix_hits
    for name, total in (("kvscope:prompt_tokens_cached_total", cached),
                        ("kvscope:prompt_tokens_computed_total", computed),
                        ("kvscope:evicted_tokens_total", s.evicted_tokens), ("kvscope:session_drops_total", 0),
                        ("kvscope:oom_events_total", s.oom_events)):
        _counter(r, name, name.split(":")[1].replace("_", " "), labels, values, total)
    swaps = Counter("kvscope:session_swaps_total", "session swaps", ["direction"], registry=r)
    swaps.labels("in").inc(100)  # swaps back in are not pushed-out sessions and must not count as a storm
    if s.preemptions:
        swaps.labels("out").inc(s.preemptions)
    outcomes = Counter("kvscope:requests_total", "requests by outcome", ["outcome"], registry=r)
    for outcome, n in (("ok", len(s.ttft)), ("refused", s.refused), ("error", 0), ("cancelled", 0)):
        if n:
            outcomes.labels(outcome).inc(n)
    _histogram(r, "kvscope:time_to_first_token_seconds", "time to first token", labels, values, VLLM_TTFT_BUCKETS,
               s.ttft)
    _histogram(r, "kvscope:inter_token_latency_seconds", "inter-token latency", labels, values, VLLM_ITL_BUCKETS,
               s.itl)
    return generate_latest(r).decode()


RENDER = {"vllm": vllm, "vllm-legacy": lambda s: vllm(s, legacy=True), "sglang": sglang, "kvscope": kvscope}
