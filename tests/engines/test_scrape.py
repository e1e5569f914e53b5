"""Parsing engines' /metrics text with prometheus_client's parser, engine detection and histogram quantiles."""

from __future__ import annotations

import pytest

from kvscope.engines.metric_names import ENGINES, detect
from kvscope.engines.scrape import Histogram, normalize_url, parse
from kvscope.engines.window import missing, record
from kvscope.errors import UsageError
from tests.engines.engine_metrics import RENDER, State


@pytest.mark.parametrize("engine, expected", [("vllm", "vllm"), ("vllm-legacy", "vllm"), ("sglang", "sglang"),
                                              ("kvscope", "kvscope")])
def test_detect_engine_from_its_metric_names(engine, expected):
    snap = parse(RENDER[engine](State(kv_usage=0.5, running=3)))
    assert detect(snap.families).engine == expected


def test_vllm_values_summed_over_label_sets():
    text = RENDER["vllm"](State(kv_usage=0.25, running=3, waiting=2, preemptions=7, prefix_queries=100,
                                prefix_hits=40))
    snap, m = parse(text), ENGINES["vllm"]
    assert snap.gauge(m.kv_usage, mean=True) == 0.25
    assert snap.gauge(m.running) == 3 and snap.gauge(m.waiting) == 2
    assert snap.counter(m.preemptions) == 7  # exposed as vllm:num_preemptions_total
    assert snap.counter(m.prefix_hits) == 40 and snap.counter(m.prefix_queries) == 100
    (info,) = snap.info_labels(m.info)
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) == 476_000 // 16


def test_legacy_vllm_names_are_read_as_fallbacks():
    snap, m = parse(RENDER["vllm-legacy"](State(kv_usage=0.75, itl=[0.02, 0.03]))), ENGINES["vllm"]
    assert snap.first(m.kv_usage) == "vllm:gpu_cache_usage_perc" and snap.gauge(m.kv_usage) == 0.75
    assert snap.histogram(m.itl).count == 2


def test_kvscope_swaps_in_are_not_pushed_out_sessions():
    snap, m = parse(RENDER["kvscope"](State(preemptions=4))), ENGINES["kvscope"]
    assert snap.counter(m.preemptions) == 4  # direction="out" only; the fixture always has 100 swaps in


def test_interval_record_from_two_scrapes():
    m = ENGINES["sglang"]
    a = parse(RENDER["sglang"](State(prefix_queries=1000, prefix_hits=100, preemptions=1, ttft=[0.3])))
    b = parse(RENDER["sglang"](State(prefix_queries=3000, prefix_hits=1100, preemptions=4, ttft=[0.3, 0.5, 0.7],
                                     available_tokens=100_000, evictable_tokens=76_000)))
    b.at = a.at + 30.0
    r = record(a, b, m, a.at)
    assert r.preemptions == 3 and r.preemptions_per_min == pytest.approx(6.0)
    assert r.prefix_hit_tokens == 1000 and r.prefix_query_tokens == 2000 and r.prefix_hit_rate == 0.5
    assert r.requests_finished == 2 and r.ttft_mean_s == pytest.approx(0.6)
    assert r.kv_capacity_tokens == 476_000 and r.kv_evictable_tokens == 76_000
    assert r.kv_used_tokens == 476_000 - 100_000 - 76_000


def test_counter_reset_counts_from_zero():
    m = ENGINES["vllm"]
    a, b = parse(RENDER["vllm"](State(preemptions=50))), parse(RENDER["vllm"](State(preemptions=3)))
    b.at = a.at + 60
    assert record(a, b, m, a.at).preemptions == 3


def test_histogram_quantile_interpolates_inside_the_bucket():
    h = Histogram(((0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)), sum=10.0, count=20.0)
    assert h.quantile(0.5) == pytest.approx(0.5)
    assert h.quantile(0.25) == pytest.approx(0.3)
    assert h.quantile(0.95) == pytest.approx(0.95)
    assert Histogram((), 0.0, 0.0).quantile(0.5) is None


def test_partial_metrics_say_what_is_missing():
    text = "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n" \
           'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
    snap = parse(text)
    assert set(missing(snap, detect(snap.families))) == {"running requests", "waiting requests", "preemptions",
                                                          "prefix-cache hits", "time to first token"}


@pytest.mark.parametrize("text", ["<html><body>Not Found</body></html>", "vllm:kv_cache_usage_perc{engine=0 0.5\n",
                                  "", "# just a comment\n"])
def test_malformed_text_is_a_usage_error(text):
    with pytest.raises(UsageError, match="Prometheus"):
        parse(text, source="the page at http://x/metrics")


@pytest.mark.parametrize("url, expected", [("127.0.0.1:8000", "http://127.0.0.1:8000/metrics"),
                                           ("http://h:30000/", "http://h:30000/metrics"),
                                           ("https://h/custom/metrics", "https://h/custom/metrics")])
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://h/metrics", "http://", "file:///etc/passwd"])
def test_non_http_urls_are_refused(url):
    with pytest.raises(UsageError, match="not an http"):
        normalize_url(url)
