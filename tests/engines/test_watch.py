"""`kvscope watch` against a real HTTP server on 127.0.0.1 whose metrics change on every scrape."""

from __future__ import annotations

import json

import pytest

from kvscope.cli.main import main
from kvscope.engines.watch import Watcher
from tests.engines.engine_metrics import State

INTERVAL = "0.05"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pressure(n: int) -> State:
    """A vLLM server running out of KV cache: usage climbs to 99%, 3 preemptions and more queued per scrape."""
    return State(kv_usage=min(0.99, 0.85 + 0.05 * n), running=32, waiting=n, preemptions=3 * n,
                 prefix_queries=20_000 * n, prefix_hits=1_000 * n, ttft=[2.0] * n, queue=[1.5] * n,
                 itl=[0.02] * n)


def healthy(n: int) -> State:
    return State(kv_usage=0.35, running=8, waiting=0, prefix_queries=20_000 * n, prefix_hits=15_000 * n,
                 ttft=[0.08] * n, queue=[0.001] * n, itl=[0.015] * n)


def watch_json(capsys, url, duration="0.3"):
    code, out, err = run(capsys, "watch", url, "--interval", INTERVAL, "--duration", duration, "--format", "json")
    lines = [json.loads(line) for line in out.splitlines()]
    return code, lines[:-1], lines[-1]["summary"], err


def codes(summary) -> set[str]:
    return {f["code"] for f in summary["findings"]}


def test_vllm_pressure_storm_queueing_and_low_hit_rate(metrics_server, capsys):
    server = metrics_server("vllm", pressure)
    code, records, summary, err = watch_json(capsys, server.url)
    assert code == 0, err
    assert len(records) == summary["intervals"] >= 5
    assert records[-1]["kv_usage"] == 0.99 and records[-1]["preemptions"] == 3
    assert codes(summary) == {"storm", "kv_pressure", "queueing", "low_hit"}
    storm = next(f for f in summary["findings"] if f["code"] == "storm")
    assert storm["evidence"]["events"] == 3 * summary["intervals"] and "preemptions in" in storm["detail"]
    low = next(f for f in summary["findings"] if f["code"] == "low_hit")
    assert low["evidence"]["hit_rate"] == pytest.approx(0.05)


def test_healthy_vllm_has_no_findings(metrics_server, capsys):
    server = metrics_server("vllm", healthy)
    code, records, summary, _ = watch_json(capsys, server.url)
    assert code == 0 and records and summary["findings"] == []
    assert summary["totals"]["prefix_hit_rate"] == pytest.approx(0.75)


def test_legacy_vllm_names(metrics_server, capsys):
    server = metrics_server("vllm-legacy", pressure)
    _, records, summary, _ = watch_json(capsys, server.url)
    assert records[-1]["kv_usage"] == 0.99 and "kv_pressure" in codes(summary)


def test_sglang_evictable_radix_tokens_are_not_a_leak(metrics_server, capsys):
    # 2% of the pool free, 80% evictable prefixes, requests hold 18%: it looks full and is not
    server = metrics_server("sglang", lambda n: State(running=4, available_tokens=9_520, evictable_tokens=380_800,
                                                      prefix_queries=50_000 * n, prefix_hits=40_000 * n))
    _, records, summary, _ = watch_json(capsys, server.url)
    assert codes(summary) == {"evictable"}
    assert records[-1]["kv_usage"] == 0.18  # sglang:token_usage excludes evictable tokens
    finding = summary["findings"][0]
    assert finding["evidence"]["evictable_tokens"] == 380_800 and "not a leak" in finding["detail"]


def test_sglang_retraction_storm(metrics_server, capsys):
    server = metrics_server("sglang", lambda n: State(running=60, waiting=20, preemptions=5 * n,
                                                      available_tokens=4_000, evictable_tokens=0))
    _, _, summary, _ = watch_json(capsys, server.url)
    assert {"storm", "kv_pressure"} <= codes(summary)
    storm = next(f for f in summary["findings"] if f["code"] == "storm")
    assert storm["title"] == "retraction storm" and "retractions in" in storm["detail"]


def test_kvscope_server_swaps_ooms_and_refusals(metrics_server, capsys):
    server = metrics_server("kvscope", lambda n: State(kv_usage=0.97, running=6, waiting=2, preemptions=4 * n,
                                                       oom_events=n // 3, refused=2 * n, ttft=[0.5] * n,
                                                       available_tokens=10_000))
    _, records, summary, _ = watch_json(capsys, server.url)
    assert summary["engine"] == "kvscope"
    assert {"storm", "kv_pressure", "oom", "refused"} <= codes(summary)
    assert records[-1]["preemptions"] == 4  # only direction="out": the 100 swaps in never count
    assert records[-1]["kv_used_tokens"] == 466_000


def test_table_output_and_summary(metrics_server, capsys):
    server = metrics_server("vllm", pressure)
    code, out, _ = run(capsys, "watch", server.url.removeprefix("http://"), "--interval", INTERVAL, "--duration",
                       "0.2")
    assert code == 0
    assert "Summary" in out and "preemption storm" in out and "fix:" in out


def test_server_that_goes_away_keeps_what_was_seen(metrics_server, capsys):
    server = metrics_server("vllm", pressure, stop_after=3)
    code, records, summary, err = watch_json(capsys, server.url, duration="1")
    assert code == 1 and len(records) == 2 == summary["intervals"]
    assert "stopped after 2 intervals" in err and "HTTP 503" in summary["stopped"]


def test_partial_metrics_are_reported(metrics_server, capsys):
    body = "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.95\n"
    server = metrics_server("vllm", body=body)
    code, records, summary, _ = watch_json(capsys, server.url, duration="0.15")
    assert code == 0 and records[0]["preemptions"] is None and records[0]["ttft_p95_s"] is None
    assert "preemptions" in summary["not_exposed"] and "kv_pressure" in codes(summary)


def test_watcher_api(metrics_server):
    server = metrics_server("sglang", lambda n: State(running=n))
    w = Watcher(server.url, interval_s=0.01)
    assert w.start().engine == "sglang"
    w.run(0.03)
    assert [r.running for r in w.records] == [2.0, 3.0, 4.0]
    assert w.summary()["intervals"] == 3


@pytest.mark.parametrize("argv, fragment", [
    (["--interval", "0"], "interval must be a positive"),
    (["--interval", "1", "--duration", "0.5"], "shorter than one --interval"),
    (["--duration", "-3"], "duration must be a positive"),
])
def test_bad_options_exit_2(metrics_server, capsys, argv, fragment):
    server = metrics_server("vllm", healthy)
    code, _, err = run(capsys, "watch", server.url, *argv)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_unreachable_url_exit_2(capsys, free_port):
    code, _, err = run(capsys, "watch", f"127.0.0.1:{free_port}", "--duration", "1", "--interval", "1")
    assert code == 2 and f"cannot reach http://127.0.0.1:{free_port}/metrics" in err and "change the URL" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_server_that_is_no_engine_exit_2(metrics_server, capsys):
    body = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n" \
           "# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\"} 3\n"
    server = metrics_server("vllm", body=body)
    code, _, err = run(capsys, "watch", server.url, "--duration", "1", "--interval", "1")
    assert code == 2 and "none of vLLM's, SGLang's or kvscope's" in err and "process_cpu_seconds" in err


@pytest.mark.parametrize("body, status, fragment", [
    ("<html><h1>Welcome</h1></html>", 200, "not valid Prometheus text"),
    ("vllm:kv_cache_usage_perc{engine=\"0\" 0.5\n", 200, "not valid Prometheus text"),
    ("not here", 404, "answered HTTP 404"),
])
def test_malformed_or_refused_pages_exit_2(metrics_server, capsys, body, status, fragment):
    server = metrics_server("vllm", body=body, status=status)
    code, _, err = run(capsys, "watch", server.url, "--duration", "1", "--interval", "1")
    assert code == 2 and fragment in err and "Traceback" not in err
