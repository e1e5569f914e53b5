"""Prometheus metrics of one server, in its own `CollectorRegistry` (several servers can live in one process).

Names and meanings follow vLLM's and SGLang's where they have one (docs/chat.md has the table), under `kvscope:`.
Gauges and the KV counters are read from the session store when Prometheus scrapes (the store keeps plain integers;
nothing is paid per token); request outcomes and the latency histograms are recorded by the server as they happen.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = ("ok", "refused", "error", "cancelled")
SESSION_STATES = ("active", "idle", "swapped")
# vLLM's buckets for time to first token and inter-token latency (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The registry of one server: `render()` is the /metrics body."""

    def __init__(self, engine, queue: Callable[[], tuple[int, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("kvscope:requests", "Requests by outcome: ok, refused (429/503 with Retry-After), "
                                "error (4xx/5xx), cancelled (the client went away)", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.ttft = Histogram("kvscope:time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "token (queueing, KV restore and prefill)", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram("kvscope:inter_token_latency_seconds", "Time between two tokens of one reply",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.registry.register(_StoreCollector(engine, queue))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    """Gauges and KV counters read from the engine's session store at scrape time."""

    def __init__(self, engine, queue: Callable[[], tuple[int, int]]):
        self.engine, self.queue = engine, queue

    def describe(self):
        return []  # collected at scrape time only (no values at registration)

    def collect(self):
        snap = self.engine.store.snapshot()
        running, waiting = self.queue()
        t = snap.totals
        yield _gauge("kvscope:kv_cache_usage_perc", "Fraction of the global KV budget in use (1 = full)", snap.usage)
        yield _gauge("kvscope:kv_used_tokens", "KV slots per layer allocated or reserved by resident sessions",
                     snap.used_tokens)
        yield _gauge("kvscope:kv_budget_tokens", "Global KV budget, slots per layer over all sessions",
                     snap.budget_tokens)
        yield _gauge("kvscope:kv_used_bytes", "KV bytes allocated or reserved by resident sessions", snap.used_bytes)
        yield _gauge("kvscope:kv_budget_bytes", "Global KV budget in bytes", snap.budget_bytes)
        yield _gauge("kvscope:num_requests_running", "Requests whose turn is running on the model", running)
        yield _gauge("kvscope:num_requests_waiting", "Requests admitted and waiting for the model", waiting)
        sessions = GaugeMetricFamily("kvscope:sessions", "Sessions by state: active (a request holds it), idle (KV "
                                     "resident), swapped (KV in CPU memory)", labels=["state"])
        for state in SESSION_STATES:
            sessions.add_metric([state], snap.states[state])
        yield sessions
        yield _counter("kvscope:prompt_tokens_cached", "Prompt tokens whose KV was reused (prefix hits)",
                       t.reused_tokens)
        yield _counter("kvscope:prompt_tokens_computed", "Prompt tokens prefilled", t.computed_tokens)
        yield _counter("kvscope:evicted_tokens", "KV tokens evicted by the sessions' own policies (mean over layers)",
                       t.evicted_tokens)
        swaps = CounterMetricFamily("kvscope:session_swaps", "Sessions moved between device and CPU memory",
                                    labels=["direction"])
        swaps.add_metric(["in"], t.swaps_in)
        swaps.add_metric(["out"], t.swaps_out)
        yield swaps
        yield _counter("kvscope:session_drops", "Idle sessions whose KV was freed for recompute", t.drops)
        yield _counter("kvscope:oom_events", "Turns that ran out of device memory", self.engine.oom_events)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
