"""What a watch saw, as findings with the numbers behind them: sustained KV pressure, preemption (vLLM) or retraction
(SGLang) storms, a low prefix-hit rate, latency driven by queueing, SGLang's evictable radix tokens read as use,
and kvscope's own OOM events and refusals.

Every threshold is a module constant with the reason for its value; docs/engines.md lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kvscope.engines.metric_names import MetricSet
from kvscope.engines.window import Record

PRESSURE_USAGE = 0.90  # vLLM preempts and SGLang retracts when a decode step finds no free block; 90% leaves ~a step
PRESSURE_SHARE = 0.5  # "sustained": at least half of the intervals watched
MIN_INTERVALS = 2  # one interval says nothing about "sustained"
STORM_EVENTS = 5  # fewer are the normal tail of a burst
STORM_PER_MIN = 2.0  # each preemption recomputes a whole prompt: two a minute already costs visible latency
LOW_HIT_RATE = 0.20  # a multi-turn chat resends the whole history each turn: most prompt tokens should be hits
MIN_QUERY_TOKENS = 10_000  # below this the rate is noise (a handful of short prompts)
QUEUE_SHARE = 0.5  # queueing drives latency when it is at least half of the time to first token
QUEUE_TTFT_S = 0.5  # ... and the time to first token is long enough to notice
FREE_SHARE = 0.10  # SGLang: the pool "looks full" below 10% free slots
EVICTABLE_SHARE = 0.20  # ... while at least 20% of it is evictable radix-cache prefix


@dataclass(frozen=True)
class Finding:
    code: str
    title: str
    detail: str
    fix: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


FIXES = {
    ("kv_pressure", "vllm"): "give the KV cache more memory (raise --gpu-memory-utilization, or --kv-cache-dtype fp8 "
    "for twice the tokens), admit fewer sequences (--max-num-seqs) or shorten --max-model-len; `kvscope advise "
    "--engine vllm` turns a target concurrency into these flags",
    ("kv_pressure", "sglang"): "give the pool more memory (raise --mem-fraction-static, or --kv-cache-dtype fp8_e4m3), "
    "cap --max-running-requests or shorten --context-length; `kvscope advise --engine sglang` gives the numbers",
    ("kv_pressure", "kvscope"): "raise the server's KV budget, store the cache as fp8/int8 (--kv-dtype) or swap idle "
    "sessions to CPU; `kvscope plan` predicts what fits",
    ("storm", "vllm"): "each preemption frees a request's blocks and recomputes it later: admit fewer sequences "
    "(--max-num-seqs), give the KV cache more memory (--gpu-memory-utilization, --kv-cache-dtype fp8) or add a "
    "GPU (--tensor-parallel-size)",
    ("storm", "sglang"): "'KV cache pool is full. Retract requests.': raise --schedule-conservativeness (admits fewer "
    "new tokens per step), cap --max-running-requests, or raise --mem-fraction-static / use --kv-cache-dtype fp8_e4m3",
    ("storm", "kvscope"): "sessions are pushed out faster than they go idle: raise the KV budget or lower the number "
    "of concurrent sessions",
    ("low_hit", "vllm"): "keep prefix caching on (the V1 default; not --no-enable-prefix-caching), route a "
    "conversation to the same replica, and relieve KV pressure so prefixes are not evicted before the next turn",
    ("low_hit", "sglang"): "keep the radix cache on (no --disable-radix-cache), use cache-aware routing across "
    "replicas, and relieve KV pressure so prefixes survive until the next turn",
    ("low_hit", "kvscope"): "send the session id with every turn so the server reuses its KV, and give idle sessions "
    "room (a larger budget or CPU swap) instead of dropping them",
    ("queueing", "vllm"): "if KV usage is also high the queue waits for memory (see KV pressure); otherwise it waits "
    "for a batch slot: raise --max-num-seqs / --max-num-batched-tokens, or add replicas",
    ("queueing", "sglang"): "if token usage is also high the queue waits for memory (see KV pressure); otherwise raise "
    "--max-running-requests / --chunked-prefill-size, or add replicas",
    ("queueing", "kvscope"): "requests wait for the KV budget or a batch slot: raise the budget or run another replica",
    ("evictable", "sglang"): "nothing to fix: watch sglang:token_usage, which excludes evictable tokens; "
    "--disable-radix-cache would free no memory a request can use and would lose the prefix hits",
    ("oom", "kvscope"): "lower the KV budget or store the cache as fp8/int8 (--kv-dtype); `kvscope doctor` reproduces "
    "and explains an OOM",
    ("refused", "kvscope"): "requests were refused for lack of KV budget: raise the budget or lower concurrency",
}


def _known(records: list[Record], attr: str) -> list[float]:
    return [v for r in records if (v := getattr(r, attr)) is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _minutes(records: list[Record]) -> float:
    return sum(r.interval_s for r in records) / 60.0


def _span(minutes: float) -> str:
    return f"{minutes * 60:.0f} s" if minutes < 1 else f"{minutes:.1f} min"


def kv_pressure(records: list[Record], m: MetricSet) -> Finding | None:
    usage = _known(records, "kv_usage")
    high = [u for u in usage if u >= PRESSURE_USAGE]
    if len(usage) < MIN_INTERVALS or len(high) / len(usage) < PRESSURE_SHARE:
        return None
    waiting = _mean(_known(records, "waiting"))
    detail = (f"KV cache usage was at or above {PRESSURE_USAGE:.0%} in {len(high)} of {len(usage)} intervals "
              f"(mean {_mean(usage):.1%}, max {max(usage):.1%})")
    if waiting is not None:
        detail += f"; {waiting:.1f} requests waited on average"
    return Finding("kv_pressure", "sustained KV-cache pressure", detail, FIXES[("kv_pressure", m.engine)],
                   {"intervals": len(usage), "intervals_high": len(high), "mean_usage": _mean(usage),
                    "max_usage": max(usage), "mean_waiting": waiting})


def storm(records: list[Record], m: MetricSet) -> Finding | None:
    events = _known(records, "preemptions")
    total, minutes = sum(events), _minutes(records)
    if not events or total < STORM_EVENTS or minutes <= 0 or total / minutes < STORM_PER_MIN:
        return None
    peak = max(_known(records, "preemptions_per_min"))
    usage = _mean(_known(records, "kv_usage"))
    detail = f"{total:.0f} {m.preempt_label} in {_span(minutes)} ({total / minutes:.1f}/min, peak {peak:.1f}/min)"
    if usage is not None:
        detail += f" while KV usage averaged {usage:.1%}"
    name = {"vllm": "preemption storm", "sglang": "retraction storm"}.get(m.engine, "session swap storm")
    return Finding("storm", name, detail, FIXES[("storm", m.engine)],
                   {"events": total, "minutes": minutes, "per_min": total / minutes, "peak_per_min": peak,
                    "mean_usage": usage})


def low_hit(records: list[Record], m: MetricSet) -> Finding | None:
    hits, queries = sum(_known(records, "prefix_hit_tokens")), sum(_known(records, "prefix_query_tokens"))
    if queries >= MIN_QUERY_TOKENS:
        rate = hits / queries
        basis = f"{rate:.1%} of {queries:,.0f} prompt tokens came from the prefix cache ({hits:,.0f} reused)"
    else:
        busy = [r.prefix_hit_rate for r in records if r.prefix_hit_rate is not None and (r.running or 0) > 0]
        if queries or len(busy) < MIN_INTERVALS:
            return None  # too little traffic for a rate (counters), or no engine gauge to fall back on
        rate = _mean(busy)
        basis = f"the engine's cache_hit_rate gauge averaged {rate:.1%} over {len(busy)} busy intervals"
    if rate >= LOW_HIT_RATE:
        return None
    detail = (f"{basis}; on a multi-turn workload, where every turn resends the conversation so far, most prompt "
              f"tokens should be hits")
    return Finding("low_hit", "low prefix-cache hit rate", detail, FIXES[("low_hit", m.engine)],
                   {"hit_rate": rate, "hit_tokens": hits, "query_tokens": queries})


def _weighted(records: list[Record], attr: str) -> float | None:
    pairs = [(getattr(r, attr), r.requests_finished) for r in records
             if getattr(r, attr) is not None and r.requests_finished]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def queueing(records: list[Record], m: MetricSet) -> Finding | None:
    ttft, p95 = _weighted(records, "ttft_mean_s"), max(_known(records, "ttft_p95_s"), default=None)
    if ttft is None or ttft < QUEUE_TTFT_S:
        return None
    queue = _weighted(records, "queue_mean_s")
    waiting = _known(records, "waiting")
    if queue is not None:
        if queue / ttft < QUEUE_SHARE:
            return None
        detail = (f"requests waited {queue:.2f} s on average before being scheduled, {queue / ttft:.0%} of the "
                  f"{ttft:.2f} s mean time to first token (p95 up to {p95:.2f} s)")
    else:
        queued = [w for w in waiting if w > 0]
        if len(waiting) < MIN_INTERVALS or len(queued) / len(waiting) < QUEUE_SHARE:
            return None
        detail = (f"requests were queued in {len(queued)} of {len(waiting)} intervals while the mean time to first "
                  f"token was {ttft:.2f} s (p95 up to {p95:.2f} s)")
    if waiting:
        detail += f"; {_mean(waiting):.1f} requests waiting on average"
    return Finding("queueing", "latency driven by queueing", detail, FIXES[("queueing", m.engine)],
                   {"ttft_mean_s": ttft, "ttft_p95_max_s": p95, "queue_mean_s": queue,
                    "mean_waiting": _mean(waiting)})


def evictable(records: list[Record], m: MetricSet) -> Finding | None:
    rows = [r for r in records if r.kv_capacity_tokens and r.kv_available_tokens is not None
            and r.kv_evictable_tokens is not None]
    looks_full = [r for r in rows if r.kv_available_tokens / r.kv_capacity_tokens < FREE_SHARE
                  and r.kv_evictable_tokens / r.kv_capacity_tokens >= EVICTABLE_SHARE]
    if m.engine != "sglang" or len(rows) < MIN_INTERVALS or len(looks_full) / len(rows) < PRESSURE_SHARE:
        return None
    last = looks_full[-1]
    cap, free, evict = last.kv_capacity_tokens, last.kv_available_tokens, last.kv_evictable_tokens
    used = last.kv_used_tokens if last.kv_used_tokens is not None else cap - free - evict
    detail = (f"in {len(looks_full)} of {len(rows)} intervals under {FREE_SHARE:.0%} of the pool was free (last: "
              f"{free:,.0f} of {cap:,.0f} slots), but {evict:,.0f} slots ({evict / cap:.0%}) held radix-cache prefixes "
              f"that SGLang evicts on demand; requests held {used:,.0f} ({used / cap:.0%}). This is the prefix cache "
              f"doing its job, not a leak: max_total_num_tokens - kv_available_tokens (or nvidia-smi) counts it as use")
    return Finding("evictable", "evictable radix-cache tokens, not a leak", detail, FIXES[("evictable", "sglang")],
                   {"capacity_tokens": cap, "available_tokens": free, "evictable_tokens": evict, "used_tokens": used})


def kvscope_events(records: list[Record], m: MetricSet) -> list[Finding]:
    out = []
    events = (("oom", "oom_events", "out-of-memory events"), ("refused", "refused", "refused requests"))
    for code, attr, title in events:
        total = sum(_known(records, attr))
        if m.engine == "kvscope" and total > 0:
            out.append(Finding(code, title, f"{total:.0f} {title} in {_span(_minutes(records))}",
                               FIXES[(code, "kvscope")], {"events": total}))
    return out


def analyse(records: list[Record], m: MetricSet) -> list[Finding]:
    """Every finding the records support, most urgent first."""
    found = [rule(records, m) for rule in (storm, kv_pressure, queueing, evictable, low_hit)]
    return kvscope_events(records, m) + [f for f in found if f is not None]
