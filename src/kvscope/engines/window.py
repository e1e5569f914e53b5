"""One watch interval: what changed between two scrapes, as a `Record` (rates per minute, quantiles of the latencies
observed in the interval, the KV gauges at its end)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvscope.engines.metric_names import MetricSet
from kvscope.engines.scrape import Histogram, Snapshot


@dataclass(frozen=True)
class Record:
    t_s: float  # end of the interval, seconds since the first scrape
    interval_s: float
    kv_usage: float | None
    kv_used_tokens: float | None
    kv_capacity_tokens: float | None
    kv_available_tokens: float | None
    kv_evictable_tokens: float | None
    running: float | None
    waiting: float | None
    preemptions: float | None  # events in the interval (vLLM preemptions, SGLang retractions, kvscope swaps+drops)
    preemptions_per_min: float | None
    prefix_hit_tokens: float | None
    prefix_query_tokens: float | None
    prefix_hit_rate: float | None
    evicted_tokens_per_min: float | None
    requests_finished: float | None  # TTFT observations in the interval
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_mean_s: float | None
    itl_p50_s: float | None
    queue_mean_s: float | None
    oom_events: float | None
    refused: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def delta(new: float | None, old: float | None) -> float | None:
    """Counter increase; a smaller new value means the server restarted and counts from zero again."""
    if new is None or old is None:
        return None
    return new if new < old else new - old


def _per_min(count: float | None, seconds: float) -> float | None:
    return None if count is None or seconds <= 0 else count * 60.0 / seconds


def _hist(cur: Snapshot, prev: Snapshot, names: tuple[str, ...]) -> Histogram | None:
    h = cur.histogram(names)
    return h.minus(prev.histogram(names)) if h is not None else None


def _prefix(cur: Snapshot, prev: Snapshot, m: MetricSet) -> tuple[float | None, float | None, float | None]:
    """(hit tokens, queried tokens, hit rate) over the interval; the engine's own gauge when it has no counters."""
    hits = delta(cur.counter(m.prefix_hits), prev.counter(m.prefix_hits)) if m.prefix_hits else None
    if m.prefix_computed:
        computed = delta(cur.counter(m.prefix_computed), prev.counter(m.prefix_computed))
        queries = None if hits is None or computed is None else hits + computed
    else:
        queries = delta(cur.counter(m.prefix_queries), prev.counter(m.prefix_queries)) if m.prefix_queries else None
    if hits is not None and queries:
        return hits, queries, hits / queries
    gauge = cur.gauge(m.prefix_hit_gauge, mean=True) if m.prefix_hit_gauge else None
    return hits, queries, gauge


def _preemptions(cur: Snapshot, prev: Snapshot, m: MetricSet) -> float | None:
    if cur.first(m.preemptions):
        return delta(cur.counter(m.preemptions), prev.counter(m.preemptions))
    # older SGLang: a gauge holding the count retracted in the engine's last logging interval
    return cur.gauge(m.preemptions_gauge) if m.preemptions_gauge else None


def _capacity(cur: Snapshot, m: MetricSet) -> float | None:
    if m.capacity_tokens:
        return cur.gauge(m.capacity_tokens)
    # vLLM: cache_config_info carries num_gpu_blocks and block_size as labels, one series per data-parallel engine
    try:
        total = sum(float(i["num_gpu_blocks"]) * float(i["block_size"]) for i in cur.info_labels(m.info))
    except (KeyError, ValueError):
        return None
    return total or None


def _used(cur: Snapshot, m: MetricSet, usage: float | None, capacity: float | None) -> float | None:
    used = cur.gauge(m.used_tokens) if m.used_tokens else None
    if used is None and usage is not None and capacity:
        used = usage * capacity
    return used


def record(prev: Snapshot, cur: Snapshot, m: MetricSet, t0: float) -> Record:
    """The interval from `prev` to `cur`."""
    seconds = max(cur.at - prev.at, 1e-9)
    usage = cur.gauge(m.kv_usage, mean=True)
    capacity = _capacity(cur, m)
    pre = _preemptions(cur, prev, m)
    hits, queries, rate = _prefix(cur, prev, m)
    evicted = delta(cur.counter(m.evicted_tokens), prev.counter(m.evicted_tokens)) if m.evicted_tokens else None
    ttft, itl, queue = _hist(cur, prev, m.ttft), _hist(cur, prev, m.itl), _hist(cur, prev, m.queue_time)
    refused = None
    if m.requests and cur.first(m.requests):
        refused = delta(cur.by_label(m.requests[0], "outcome").get("refused", 0.0),
                        prev.by_label(m.requests[0], "outcome").get("refused", 0.0))
    oom = delta(cur.counter(m.oom_events), prev.counter(m.oom_events)) if m.oom_events else None
    return Record(
        t_s=round(cur.at - t0, 3), interval_s=round(seconds, 3), kv_usage=usage,
        kv_used_tokens=_used(cur, m, usage, capacity), kv_capacity_tokens=capacity,
        kv_available_tokens=cur.gauge(m.available_tokens) if m.available_tokens else None,
        kv_evictable_tokens=cur.gauge(m.evictable_tokens) if m.evictable_tokens else None,
        running=cur.gauge(m.running), waiting=cur.gauge(m.waiting),
        preemptions=pre, preemptions_per_min=_per_min(pre, seconds),
        prefix_hit_tokens=hits, prefix_query_tokens=queries, prefix_hit_rate=rate,
        evicted_tokens_per_min=_per_min(evicted, seconds),
        requests_finished=ttft.count if ttft else None,
        ttft_p50_s=ttft.quantile(0.5) if ttft else None, ttft_p95_s=ttft.quantile(0.95) if ttft else None,
        ttft_mean_s=ttft.mean if ttft else None, itl_p50_s=itl.quantile(0.5) if itl else None,
        queue_mean_s=queue.mean if queue else None, oom_events=oom, refused=refused,
    )


def missing(cur: Snapshot, m: MetricSet) -> list[str]:
    """The quantities this engine should expose but this server does not (partial metrics)."""
    wanted = {"KV usage": m.kv_usage, "running requests": m.running, "waiting requests": m.waiting,
              m.preempt_label: m.preemptions + m.preemptions_gauge,
              "prefix-cache hits": m.prefix_hits + m.prefix_hit_gauge, "time to first token": m.ttft}
    return [label for label, names in wanted.items() if names and cur.first(names) is None]
