"""`Watcher`: scrape a server's /metrics every interval, keep one `Record` per interval, and summarise with findings.

>>> w = Watcher("http://127.0.0.1:8000/metrics", interval_s=5)   # doctest: +SKIP
>>> w.start(); w.step(); w.summary()["findings"]                # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvscope.engines import findings as rules
from kvscope.engines.metric_names import ENGINES, MetricSet, detect
from kvscope.engines.scrape import Snapshot, normalize_url, scrape
from kvscope.engines.window import Record, missing, record
from kvscope.errors import KvscopeError, require_positive, usage


def identify(snapshot: Snapshot, url: str) -> MetricSet:
    """The engine behind these metrics; a server that is none of the three is a usage error naming what it serves."""
    m = detect(snapshot.families)
    if m is not None:
        return m
    names = sorted(snapshot.families)
    sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise usage(f"{url} serves {len(names)} metric families ({sample}) but none of vLLM's, SGLang's or kvscope's",
                expected="vllm:kv_cache_usage_perc, sglang:token_usage or kvscope:kv_cache_usage_perc among them",
                fix="the URL argument (the engine's own /metrics port; SGLang needs --enable-metrics)")


class Watcher:
    """Owns the scrapes of one watch: the last snapshot, the records so far, and why it stopped."""

    def __init__(self, url: str, *, interval_s: float = 5.0, timeout_s: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        require_positive("interval", interval_s, option="--interval")
        self.url = normalize_url(url)
        self.interval_s = float(interval_s)
        self.timeout_s = timeout_s
        self._sleep = sleep
        self.metrics: MetricSet | None = None
        self.records: list[Record] = []
        self.missing: list[str] = []
        self.stopped: str | None = None
        self._last: Snapshot | None = None
        self._t0 = 0.0

    def start(self) -> MetricSet:
        """First scrape: find the engine. Raises `UsageError` for an unreachable URL or foreign metrics."""
        self._last = scrape(self.url, timeout=self.timeout_s)
        self._t0 = self._last.at
        self.metrics = identify(self._last, self.url)
        self.missing = missing(self._last, self.metrics)
        return self.metrics

    def step(self) -> Record | None:
        """Wait one interval, scrape, and return the new record; None (with `stopped` set) if the server went away."""
        if self._last is None or self.metrics is None:
            raise KvscopeError("Watcher.step() before start()")
        self._sleep(self.interval_s)
        try:
            snap = scrape(self.url, timeout=self.timeout_s)
        except ValueError as exc:  # the first scrape worked: a failure now ends the watch, keeping what was seen
            self.stopped = f"stopped after {len(self.records)} intervals: {exc}"
            return None
        if detect(snap.families) is not self.metrics:
            self.stopped = (f"stopped after {len(self.records)} intervals: {self.url} no longer serves "
                            f"{self.metrics.engine} metrics")
            return None
        rec = record(self._last, snap, self.metrics, self._t0)
        self._last = snap
        self.records.append(rec)
        return rec

    def run(self, duration_s: float, on_record: Callable[[Record], None] | None = None) -> None:
        """Step until `duration_s` has passed since the first scrape (at least one interval) or the server goes away."""
        require_positive("duration", duration_s, option="--duration")
        steps = max(1, round(duration_s / self.interval_s))
        for _ in range(steps):
            rec = self.step()
            if rec is None:
                return
            if on_record:
                on_record(rec)

    def summary(self) -> dict:
        """Totals over the watch and the findings, each with the numbers behind it."""
        m = self.metrics or ENGINES["vllm"]
        recs = self.records
        found = rules.analyse(recs, m) if recs else []
        return {
            "url": self.url, "engine": m.engine, "versions": m.versions, "intervals": len(recs),
            "duration_s": round(sum(r.interval_s for r in recs), 3), "not_exposed": self.missing,
            "stopped": self.stopped, "totals": totals(recs, m), "findings": [f.to_dict() for f in found],
        }


def _stat(values: list[float], fn) -> float | None:
    return fn(values) if values else None


def totals(recs: list[Record], m: MetricSet) -> dict:
    def known(attr: str) -> list[float]:
        return [v for r in recs if (v := getattr(r, attr)) is not None]

    minutes = sum(r.interval_s for r in recs) / 60.0
    events = known("preemptions")
    hits, queries = sum(known("prefix_hit_tokens")), sum(known("prefix_query_tokens"))
    return {
        "kv_usage_mean": _stat(known("kv_usage"), lambda v: sum(v) / len(v)),
        "kv_usage_max": _stat(known("kv_usage"), max),
        "preempt_label": m.preempt_label,
        "preemptions": sum(events) if events else None,
        "preemptions_per_min": sum(events) / minutes if events and minutes > 0 else None,
        "prefix_hit_rate": hits / queries if queries else _stat(known("prefix_hit_rate"), lambda v: sum(v) / len(v)),
        "waiting_mean": _stat(known("waiting"), lambda v: sum(v) / len(v)),
        "ttft_p95_max_s": _stat(known("ttft_p95_s"), max),
    }
